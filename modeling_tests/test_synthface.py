"""SynthFace: taxonomy, consistent sampling, deterministic grid-aligned rendering, captions, VQA, splits, datasets."""

import itertools
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from transformers_f2ace.data import (
    ANSWER_VOCABULARY,
    ATTRIBUTES,
    GRID,
    PALETTE,
    SPLIT_SEED_OFFSET,
    apply_occlusion,
    caption,
    example_attributes,
    example_seed,
    load_synthface,
    make_example,
    render_face,
    sample_attributes,
    save_gallery,
    split_of,
    visible_attributes,
    vqa_pairs,
)
from transformers_f2ace.data.attributes import MASK_COLOUR, MIN_COLOUR_DISTANCE
from transformers_f2ace.data.text import QUESTIONS, VALUE_CHECKS


# A face with every category visible (medium hair, no hat, nothing covering eyes or mouth).
BASE = dict(
    face_shape="oval", skin_tone="light", hair_colour="brown", bald="no", hair_length="medium", hair_style="straight",
    bangs="no", eye_colour="blue", eyes_closed="no", eyebrows="thin", eyebrows_raised="no", beard="none",
    moustache="no", stubble="no", glasses="none", sunglasses="no", hat="none", hat_colour=None, earrings="none",
    mask="no", lipstick="none", blush="no", smiling="no", mouth_open="no", background="green",
)
# Where each category is drawn, as (row0, row1, col0, col1) inclusive unit cells of the 8 x 8 grid (see render.py).
REGION = {
    "face_shape": (0, 7, 0, 7), "skin_tone": (0, 7, 0, 7), "hair_colour": (0, 7, 0, 7), "bald": (0, 7, 0, 7),
    "hair_length": (0, 7, 0, 7), "hair_style": (0, 7, 0, 7), "bangs": (1, 2, 1, 6), "eye_colour": (3, 3, 2, 5),
    "eyes_closed": (3, 3, 2, 5), "eyebrows": (1, 2, 1, 6), "eyebrows_raised": (1, 2, 1, 6), "beard": (3, 7, 1, 6),
    "moustache": (4, 5, 2, 5), "stubble": (5, 7, 1, 6), "glasses": (2, 4, 1, 6), "sunglasses": (2, 4, 1, 6),
    "hat": (0, 2, 0, 7), "hat_colour": (0, 2, 0, 7), "earrings": (4, 5, 0, 7), "mask": (4, 7, 1, 6),
    "lipstick": (5, 6, 2, 5), "blush": (3, 4, 1, 6), "smiling": (5, 6, 2, 5), "mouth_open": (5, 6, 2, 5),
    "background": (0, 7, 0, 7),
}
# Minimum per-token RMS colour difference (0-255) that two values of one category must reach in some token.
MIN_TOKEN_RMS = 20.0


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _token_rms(a: Image.Image, b: Image.Image) -> np.ndarray:
    """(GRID, GRID) RMS colour difference per token cell."""
    squared = (_pixels(a) - _pixels(b)) ** 2
    cell = a.size[0] // GRID
    return np.sqrt(squared.reshape(GRID, cell, GRID, cell, 3).mean(axis=(1, 3, 4)))


def _variant(category: str, value: str) -> dict:
    attributes = dict(BASE, **{category: value})
    if category == "hat_colour":
        attributes["hat"] = "cap"
    if category == "hat" and value != "none":
        attributes["hat_colour"] = "blue"
    return attributes


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    rng = np.random.default_rng(1234)
    return [sample_attributes(rng) for _ in range(3000)]


def test_taxonomy_is_rich():
    assert len(ATTRIBUTES) >= 20
    assert all(len(values) >= 2 and len(set(values)) == len(values) for values in ATTRIBUTES.values())
    for category, colours in PALETTE.items():  # one colour per present value
        assert set(colours) == {v for v in ATTRIBUTES[category] if v not in ("no", "none")}, category


def test_every_value_is_reached(samples):
    seen = {name: set() for name in ATTRIBUTES}
    for attributes in samples:
        for name, value in attributes.items():
            seen[name].add(value)
    for name, values in ATTRIBUTES.items():
        assert set(values) <= seen[name], f"{name}: never sampled {set(values) - seen[name]}"


def test_occlusion_rules_hold(samples):
    for a in samples:
        assert apply_occlusion(a) == a
        if a["mask"] == "yes":
            assert all(a[k] is None for k in ("beard", "moustache", "stubble", "lipstick", "smiling", "mouth_open"))
        if a["sunglasses"] == "yes":
            assert a["glasses"] is None and a["eye_colour"] is None and a["eyes_closed"] is None
        if a["eyes_closed"] == "yes":
            assert a["eye_colour"] is None
        if a["bald"] == "yes":
            assert a["hair_length"] is None and a["hair_style"] is None and a["bangs"] is None
        else:
            assert a["hair_length"] is not None and a["hair_colour"] is not None
        assert (a["hat"] == "none") == (a["hat_colour"] is None)
        # facial hair and lipstick never meet (one latent decides)
        has_facial_hair = a["beard"] not in (None, "none") or a["moustache"] == "yes"
        assert not (a["lipstick"] not in (None, "none") and has_facial_hair)


def test_colours_that_meet_keep_contrast(samples):
    def distance(p, q):
        return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(p, q))))

    for a in samples:
        background = PALETTE["background"][a["background"]]
        skin = PALETTE["skin_tone"][a["skin_tone"]]
        touching = [skin]
        if a["hair_colour"] is not None:
            hair = PALETTE["hair_colour"][a["hair_colour"]]
            touching.append(hair)
            assert distance(hair, skin) >= MIN_COLOUR_DISTANCE
        if a["hat_colour"] is not None:
            touching.append(PALETTE["hat_colour"][a["hat_colour"]])
        if a["mask"] == "yes":
            touching.append(MASK_COLOUR)
        assert all(distance(background, c) >= MIN_COLOUR_DISTANCE for c in touching), a


def test_render_is_deterministic_and_seeded():
    first, again = make_example("train", 3), make_example("train", 3)
    assert first["image"].tobytes() == again["image"].tobytes()
    assert first["caption"] == again["caption"] and first["qa"] == again["qa"]
    others = [make_example("train", i)["image"].tobytes() for i in range(4, 12)]
    assert first["image"].tobytes() not in others
    assert make_example("train", 3, seed=1)["attributes"] != first["attributes"]
    # the attributes alone, without rendering, are the example's
    for split, index, seed in (("train", 3, 0), ("train", 3, 1), ("test", 7, 0)):
        assert example_attributes(split, index, seed) == make_example(split, index, size=16, seed=seed)["attributes"]
    image = first["image"]
    assert image.mode == "RGB" and image.size == (64, 64)


@pytest.mark.parametrize("category", list(ATTRIBUTES))
def test_every_value_is_visibly_distinct_on_the_token_grid(category):
    """Changing only `category` (and what it hides, for bald) changes the image inside its region, by >= MIN_TOKEN_RMS
    in some token."""
    renders = {}
    for value in ATTRIBUTES[category]:
        attributes = apply_occlusion(_variant(category, value))
        assert attributes[category] == value, f"{category}={value} is hidden in the test face"
        renders[value] = render_face(attributes)
    r0, r1, c0, c1 = REGION[category]
    for (v, image_v), (w, image_w) in itertools.combinations(renders.items(), 2):
        rms = _token_rms(image_v, image_w)
        assert rms.max() >= MIN_TOKEN_RMS, f"{category}: {v} vs {w} differ by only {rms.max():.1f}"
        outside = rms.copy()
        outside[r0 : r1 + 1, c0 : c1 + 1] = 0
        assert outside.max() == 0, f"{category}: {v} vs {w} changed tokens outside rows {r0}-{r1}, cols {c0}-{c1}"


def _contrast_ok(a: dict) -> bool:
    """The sampler's colour rules, restated: colours that meet stay MIN_COLOUR_DISTANCE apart."""
    def far(p, q):
        return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(p, q)))) >= MIN_COLOUR_DISTANCE

    skin = PALETTE["skin_tone"][a["skin_tone"]]
    hair = PALETTE["hair_colour"].get(a["hair_colour"])
    hat = PALETTE["hat_colour"].get(a["hat_colour"])
    touching = [c for c in (skin, hair, hat, MASK_COLOUR if a["mask"] == "yes" else None,
                            PALETTE["earrings"].get(a["earrings"])) if c is not None]
    hat_ok = hat is None or (far(hat, skin) and (hair is None or far(hat, hair)))
    background_ok = all(far(PALETTE["background"][a["background"]], c) for c in touching)
    return background_ok and hat_ok and (hair is None or far(hair, skin))


def test_single_changes_stay_visible_on_random_faces():
    """On sampled faces, swapping one visible value for another (nothing else changing) moves some token by >= 12."""
    rng = np.random.default_rng(99)
    for _ in range(25):
        a = sample_attributes(rng)
        image = render_face(a)
        for name, value in a.items():
            for other in ATTRIBUTES[name]:
                b = dict(a, **{name: other})
                if value is None or other == value or apply_occlusion(b) != b or not _contrast_ok(b):
                    continue
                try:
                    changed = render_face(b)
                except ValueError:  # the swap reveals a category this face does not carry (e.g. a beard's colour)
                    continue
                assert _token_rms(image, changed).max() >= 12.0, (name, value, other, a)


def test_rendering_is_resolution_independent():
    rng = np.random.default_rng(7)
    a, b = sample_attributes(rng), sample_attributes(rng)
    small = _pixels(render_face(a, 64))
    big = _pixels(render_face(a, 256).resize((64, 64), Image.BOX))
    assert render_face(a, 128).size == (128, 128)
    same_face = np.abs(small - big).mean()
    other_face = np.abs(small - _pixels(render_face(b, 64))).mean()
    assert same_face < 20 and same_face < 0.5 * other_face


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="missing"):
        render_face({k: v for k, v in BASE.items() if k != "hat"})
    with pytest.raises(ValueError, match="hair_colour"):
        render_face(dict(BASE, hair_colour="purple"))
    with pytest.raises(ValueError, match="size"):
        render_face(BASE, size=8)
    with pytest.raises(ValueError, match="split"):
        load_synthface("dev", 2)
    with pytest.raises(ValueError, match="num_samples"):
        load_synthface("train", 0)


# Caption words that must appear for a visible, non-absent value (value words appear literally otherwise).
CAPTION_WORDS = {
    ("bald", "yes"): "bald", ("bangs", "yes"): "bangs", ("eyes_closed", "yes"): "closed eyes",
    ("eyebrows_raised", "yes"): "raised", ("moustache", "yes"): "moustache", ("stubble", "yes"): "stubble",
    ("sunglasses", "yes"): "sunglasses", ("mask", "yes"): "face mask", ("blush", "yes"): "blush",
    ("beard", "full"): "beard", ("smiling", "yes"): r"smiling|laughing", ("mouth_open", "yes"): r"laughing|surprised",
}


def test_captions_mention_visible_attributes(samples):
    rng = np.random.default_rng(0)
    openings = set()
    for a in samples[:400]:
        text = caption(a, rng)
        openings.add(" ".join(text.split()[:2]))
        for name, value in visible_attributes(a).items():
            if value in ("no", "none"):
                continue
            pattern = CAPTION_WORDS.get((name, value), value)
            assert re.search(pattern, text), f"{name}={value} missing from {text!r}"
        if a["glasses"] in (None, "none") and a["sunglasses"] != "yes":
            assert not re.search(r"\bglasses\b", text)
        if a["hat"] == "none":
            assert not re.search(r"\b(hat|cap|beanie)\b", text)
        if a["mask"] != "yes":
            assert not re.search(r"\bmask\b", text)
    assert len(openings) >= 4
    short = caption(samples[0], np.random.default_rng(1), num_phrases=2)
    assert len(short) < len(caption(samples[0], np.random.default_rng(1)))


def test_vqa_answers_match_attributes(samples):
    rng = np.random.default_rng(5)
    template_of = {q: name for name, templates in QUESTIONS.items() for q in templates}
    checks = [(re.escape(t).replace(re.escape("{v}"), "(.+)"), name) for name, t in VALUE_CHECKS.items()]
    for a in samples[:300]:
        asked = set()
        for question, answer in vqa_pairs(a, rng):
            assert answer in ANSWER_VOCABULARY
            if question in template_of:
                name = template_of[question]
                assert answer == a[name], (question, answer, a[name])
            elif question == "What is the facial expression?":
                name = "expression"
                expected = {("no", "no"): "neutral", ("yes", "no"): "smiling", ("no", "yes"): "surprised",
                            ("yes", "yes"): "laughing"}[(a["smiling"], a["mouth_open"])]
                assert answer == expected
            else:
                matches = [(name, re.fullmatch(p, question)) for p, name in checks]
                name, match = next((n, m) for n, m in matches if m and m.group(1) in ATTRIBUTES[n])
                assert answer == ("yes" if match.group(1) == a[name] else "no")
            asked.add(name)
        assert {n for n, v in a.items() if v is not None} <= asked


def test_splits_are_disjoint():
    ranges = {split: (offset, offset + 10**9) for split, offset in SPLIT_SEED_OFFSET.items()}
    for (s1, (lo1, hi1)), (s2, (lo2, hi2)) in itertools.combinations(ranges.items(), 2):
        assert hi1 <= lo2 or hi2 <= lo1, (s1, s2)
    assert example_seed("validation", 5) == 10**9 + 5
    combos = {}
    for split in ("train", "validation", "test"):
        for seed in (0, 1):
            for i in range(25):
                a = make_example(split, i, seed=seed)["attributes"]
                assert split_of(a) == split
                combos.setdefault(split, set()).add(json.dumps(a, sort_keys=True))
    assert not (combos["train"] & combos["validation"] or combos["train"] & combos["test"]
                or combos["validation"] & combos["test"])


def test_dataset_columns_and_types():
    ds = load_synthface("validation", num_samples=6, size=64, seed=3)
    assert ds.column_names == ["image", "attributes", "caption", "conversations", "seed"]
    assert type(ds.features["image"]).__name__ == "Image"
    row = ds[2]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    expected = make_example("validation", 2, seed=3)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected["image"]))
    attributes = json.loads(row["attributes"])
    assert attributes == expected["attributes"] and list(attributes) == list(ATTRIBUTES)
    assert row["caption"] == expected["caption"]
    user, assistant = row["conversations"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert [c["type"] for c in user["content"]] == ["image", "text"]
    assert (user["content"][1]["text"], assistant["content"][0]["text"]) == tuple(expected["qa"])
    assert row["seed"] == 10**9 + 2


def test_gallery_and_speed(tmp_path):
    path = save_gallery(str(tmp_path / "gallery.png"), n=10, columns=5, size=64, scale=2)
    assert Image.open(path).size == (5 * 128, 2 * 128)
    rng = np.random.default_rng(0)
    attributes = [sample_attributes(rng) for _ in range(200)]
    start = time.perf_counter()
    for a in attributes:
        render_face(a, 64)
    rate = len(attributes) / (time.perf_counter() - start)
    print(f"SynthFace render speed: {rate:.0f} faces/s at 64 px")
    assert rate > 50
