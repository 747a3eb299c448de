"""SynthFace attribute taxonomy, colour palettes and consistent sampling.

An attribute dict maps every category of `ATTRIBUTES` to one of its values, or to `None` when the category does not
apply or cannot be seen in the rendered image (for instance `hair_length` of a bald person, `eye_colour` behind
sunglasses, `lipstick` under a face mask). The renderer draws exactly what the dict says, so the dict *is* the image's
ground truth: every non-`None` value is visible, and `visible_attributes` simply drops the `None`s.

Colours that meet in the image (skin and hair, hat and hair, background and everything drawn on it) are sampled so
that they never come closer than `MIN_COLOUR_DISTANCE` in RGB, so each colour stays readable at 64 pixels.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np


Attributes = dict[str, Optional[str]]
RGB = tuple[int, int, int]

# Categories `apply_occlusion` can set to None (see its rules): classifiers over attributes give them an extra
# "not visible" class (`attribute_labels`).
NULLABLE = (
    "hair_colour", "hair_length", "hair_style", "bangs", "eye_colour", "eyes_closed", "beard", "moustache",
    "stubble", "glasses", "hat_colour", "lipstick", "smiling", "mouth_open",
)

# Category -> values. For categories that can be absent, the first value is the absent/default one ("no", "none").
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face_shape": ("oval", "round", "square", "heart", "long"),
    "skin_tone": ("pale", "light", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red", "grey"),
    "bald": ("no", "yes"),
    "hair_length": ("short", "medium", "long"),
    "hair_style": ("straight", "wavy", "curly"),
    "bangs": ("no", "yes"),
    "eye_colour": ("brown", "blue", "green", "grey"),
    "eyes_closed": ("no", "yes"),
    "eyebrows": ("thin", "thick"),
    "eyebrows_raised": ("no", "yes"),
    "beard": ("none", "goatee", "full"),
    "moustache": ("no", "yes"),
    "stubble": ("no", "yes"),
    "glasses": ("none", "round", "square"),
    "sunglasses": ("no", "yes"),
    "hat": ("none", "cap", "beanie", "top hat", "cowboy hat"),
    "hat_colour": ("red", "blue", "green", "yellow", "black", "white"),
    "earrings": ("none", "gold", "silver"),
    "mask": ("no", "yes"),
    "lipstick": ("none", "red", "pink"),
    "blush": ("no", "yes"),
    "smiling": ("no", "yes"),
    "mouth_open": ("no", "yes"),
    "background": ("grey", "blue", "green", "yellow", "pink", "purple"),
}

# Categories whose first value means "absent"; captions leave these out when absent.
ABSENT_VALUE: dict[str, str] = {
    name: values[0]
    for name, values in ATTRIBUTES.items()
    if values[0] in ("no", "none")
}

PALETTE: dict[str, dict[str, RGB]] = {
    "skin_tone": {
        "pale": (255, 226, 206),
        "light": (236, 186, 146),
        "tan": (198, 136, 88),
        "brown": (146, 92, 58),
        "dark": (104, 66, 44),
    },
    "hair_colour": {
        "black": (28, 26, 30),
        "brown": (110, 58, 22),
        "blonde": (245, 208, 60),
        "red": (204, 66, 28),
        "grey": (158, 160, 168),
    },
    "eye_colour": {
        "brown": (122, 66, 24),
        "blue": (40, 110, 235),
        "green": (36, 168, 64),
        "grey": (156, 158, 162),
    },
    "hat_colour": {
        "red": (214, 36, 44),
        "blue": (36, 72, 200),
        "green": (36, 140, 56),
        "yellow": (248, 200, 28),
        "black": (34, 34, 38),
        "white": (246, 246, 246),
    },
    "earrings": {"gold": (236, 176, 16), "silver": (176, 190, 214)},
    "lipstick": {"red": (214, 24, 48), "pink": (252, 116, 186)},
    "background": {
        "grey": (150, 150, 156),
        "blue": (112, 164, 236),
        "green": (128, 204, 120),
        "yellow": (250, 220, 60),
        "pink": (232, 110, 200),
        "purple": (140, 100, 210),
    },
}
MASK_COLOUR: RGB = (104, 200, 212)
MIN_COLOUR_DISTANCE = 80.0

# Probabilities of the optional features; "masculine" is a latent that decides facial hair vs. lipstick, so the two
# never meet, and picks the caption noun ("man" / "woman" / "person", see `text.py`).
PROBABILITY = {
    "masculine": 0.5,
    "bald_masculine": 0.2,
    "bald_feminine": 0.04,
    "bangs": 0.35,
    "eyes_closed": 0.15,
    "eyebrows_raised": 0.25,
    "beard_any": 0.5,
    "moustache": 0.45,
    "stubble": 0.35,
    "sunglasses": 0.15,
    "glasses_any": 0.35,
    "hat_any": 0.4,
    "earrings_masculine": 0.12,
    "earrings_feminine": 0.5,
    "mask": 0.12,
    "lipstick_any": 0.6,
    "blush_masculine": 0.15,
    "blush_feminine": 0.4,
    "smiling": 0.45,
    "mouth_open": 0.35,
}

# Splits own disjoint sets of attribute combinations: sha256(canonical JSON) mod SPLIT_MODULUS picks the split.
SPLIT_MODULUS = 20
SPLIT_BUCKETS = {"test": (0,), "validation": (1,), "train": tuple(range(2, SPLIT_MODULUS))}


def colour_distance(a: RGB, b: RGB) -> float:
    """Euclidean distance of two RGB colours (0-255 per channel)."""
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _far_from(rng: np.random.Generator, category: str, others: list[RGB]) -> str:
    """A uniform value of a colour category at least MIN_COLOUR_DISTANCE away from every colour in `others`."""
    allowed = [
        value
        for value, rgb in PALETTE[category].items()
        if all(colour_distance(rgb, other) >= MIN_COLOUR_DISTANCE for other in others)
    ]
    return str(rng.choice(allowed))


def _yes(rng: np.random.Generator, probability: float) -> str:
    return "yes" if rng.random() < probability else "no"


def _maybe(rng: np.random.Generator, category: str, probability: float) -> str:
    """The absent value with probability 1 - p, otherwise a uniform non-absent value."""
    values = ATTRIBUTES[category]
    return str(rng.choice(values[1:])) if rng.random() < probability else values[0]


def _uniform(rng: np.random.Generator, category: str) -> str:
    return str(rng.choice(ATTRIBUTES[category]))


def _sample_raw(rng: np.random.Generator) -> Attributes:
    """Every category drawn (colour contrasts respected), before occlusion is applied."""
    p = PROBABILITY
    masculine = rng.random() < p["masculine"]
    a: Attributes = {"face_shape": _uniform(rng, "face_shape"), "skin_tone": _uniform(rng, "skin_tone")}
    skin = PALETTE["skin_tone"][a["skin_tone"]]
    a["hair_colour"] = _far_from(rng, "hair_colour", [skin])
    hair = PALETTE["hair_colour"][a["hair_colour"]]
    a["bald"] = _yes(rng, p["bald_masculine"] if masculine else p["bald_feminine"])
    a["hair_length"] = _uniform(rng, "hair_length")
    a["hair_style"] = _uniform(rng, "hair_style")
    a["bangs"] = _yes(rng, p["bangs"])
    a["eye_colour"] = _uniform(rng, "eye_colour")
    a["eyes_closed"] = _yes(rng, p["eyes_closed"])
    a["eyebrows"] = _uniform(rng, "eyebrows")
    a["eyebrows_raised"] = _yes(rng, p["eyebrows_raised"])
    a["beard"] = _maybe(rng, "beard", p["beard_any"]) if masculine else "none"
    a["moustache"] = _yes(rng, p["moustache"]) if masculine else "no"
    a["stubble"] = _yes(rng, p["stubble"]) if masculine else "no"
    a["sunglasses"] = _yes(rng, p["sunglasses"])
    a["glasses"] = _maybe(rng, "glasses", p["glasses_any"])
    a["hat"] = _maybe(rng, "hat", p["hat_any"])
    a["hat_colour"] = _far_from(rng, "hat_colour", [skin, hair])
    a["earrings"] = _maybe(rng, "earrings", p["earrings_masculine"] if masculine else p["earrings_feminine"])
    a["mask"] = _yes(rng, p["mask"])
    a["lipstick"] = "none" if masculine else _maybe(rng, "lipstick", p["lipstick_any"])
    a["blush"] = _yes(rng, p["blush_masculine"] if masculine else p["blush_feminine"])
    a["smiling"] = _yes(rng, p["smiling"])
    a["mouth_open"] = _yes(rng, p["mouth_open"])
    return a


def apply_occlusion(attributes: Attributes) -> Attributes:
    """Set to `None` every category the image cannot show given the others (returns a new dict).

    Rules: a mask hides the mouth, lips and facial hair; a full beard hides stubble; baldness removes hair length,
    style and bangs, and the hair colour too unless a beard or moustache shows it; sunglasses replace glasses and hide
    the eyes; closed eyes hide the eye colour; a hat over short hair without bangs leaves too little hair to show its
    style; no hat, no hat colour. Applying it twice changes nothing.
    """
    a = dict(attributes)
    if a["mask"] == "yes":
        for name in ("beard", "moustache", "stubble", "lipstick", "smiling", "mouth_open"):
            a[name] = None
    if a["beard"] == "full":
        a["stubble"] = None
    if a["bald"] == "yes":
        a["hair_length"] = a["hair_style"] = a["bangs"] = None
        if a["beard"] in (None, "none") and a["moustache"] in (None, "no"):
            a["hair_colour"] = None
    if a["sunglasses"] == "yes":
        a["glasses"] = a["eye_colour"] = a["eyes_closed"] = None
    if a["eyes_closed"] == "yes":
        a["eye_colour"] = None
    if a["hat"] != "none" and a["hair_length"] == "short" and a["bangs"] == "no":
        a["hair_style"] = None
    if a["hat"] == "none":
        a["hat_colour"] = None
    return a


def drawn_colours(attributes: Attributes) -> list[RGB]:
    """Colours of the visible features that touch the background (skin, hair, hat, mask, earrings)."""
    colours = [PALETTE["skin_tone"][attributes["skin_tone"]]]
    if attributes["hair_colour"] is not None:
        colours.append(PALETTE["hair_colour"][attributes["hair_colour"]])
    if attributes["hat_colour"] is not None:
        colours.append(PALETTE["hat_colour"][attributes["hat_colour"]])
    if attributes["mask"] == "yes":
        colours.append(MASK_COLOUR)
    if attributes["earrings"] not in (None, "none"):
        colours.append(PALETTE["earrings"][attributes["earrings"]])
    return colours


def split_of(attributes: Attributes) -> str:
    """"train", "validation" or "test": the split that owns this attribute combination (a fixed hash bucket)."""
    canonical = json.dumps({name: attributes[name] for name in ATTRIBUTES}, sort_keys=True)
    bucket = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") % SPLIT_MODULUS
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def sample_attributes(rng: np.random.Generator, split: Optional[str] = None) -> Attributes:
    """Draw one consistent attribute dict, keys in `ATTRIBUTES` order (occluded categories set to `None`).

    Args:
        rng: numpy Generator; the result is a deterministic function of its state.
        split: if given ("train", "validation" or "test"), redraw until the combination belongs to that split
            (`split_of`), so the splits never share a face.
    """
    if split is not None and split not in SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {tuple(SPLIT_BUCKETS)} or None, got {split!r}")
    while True:
        attributes = apply_occlusion(_sample_raw(rng))
        attributes["background"] = _far_from(rng, "background", drawn_colours(attributes))
        if split is None or split_of(attributes) == split:
            return {name: attributes[name] for name in ATTRIBUTES}


def validate_attributes(attributes: Attributes) -> None:
    """Raise a ValueError unless every category is present with one of its values, or `None` where not shown."""
    missing = [name for name in ATTRIBUTES if name not in attributes]
    if missing:
        raise ValueError(f"attributes is missing categories {missing}; every key of ATTRIBUTES is required")
    unknown = [name for name in attributes if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"attributes has unknown categories {unknown}; accepted: {list(ATTRIBUTES)}")
    for name, value in attributes.items():
        if value is not None and value not in ATTRIBUTES[name]:
            raise ValueError(f"attributes[{name!r}] = {value!r}; accepted: {ATTRIBUTES[name]} or None")
    a = attributes
    needed = {  # category -> condition under which the renderer needs its value
        "face_shape": True,
        "skin_tone": True,
        "background": True,
        "hair_colour": a["bald"] != "yes" or a["beard"] in ("goatee", "full") or a["moustache"] == "yes",
        "hair_length": a["bald"] != "yes",
        "hat_colour": a["hat"] not in (None, "none"),
        "eye_colour": a["sunglasses"] != "yes" and a["eyes_closed"] != "yes",
        "smiling": a["mask"] != "yes",
        "mouth_open": a["mask"] != "yes",
    }
    for name, is_needed in needed.items():
        if is_needed and a[name] is None:
            raise ValueError(f"attributes[{name!r}] is None but this face shows it; accepted: {ATTRIBUTES[name]}")


def attribute_class_counts(
    categories: Optional[Mapping[str, Sequence[str]]] = None, nullable: Sequence[str] = NULLABLE
) -> dict[str, int]:
    """Category -> number of classes of a classifier over it: its values (default `ATTRIBUTES`), plus the "not
    visible" class for the `nullable` ones (the labels of `attribute_labels`)."""
    categories = ATTRIBUTES if categories is None else categories
    return {name: len(values) + (name in nullable) for name, values in categories.items()}


def attribute_labels(
    attributes: Sequence[Attributes],
    categories: Optional[Mapping[str, Sequence[str]]] = None,
    nullable: Sequence[str] = NULLABLE,
) -> dict[str, np.ndarray]:
    """Attribute dicts -> category -> class indices, int64 (batch,): a value's index among `categories[name]`
    (default `ATTRIBUTES`), and `len(values)` (the "not visible" class) for `None`, allowed only in `nullable`."""
    categories = ATTRIBUTES if categories is None else categories
    labels = {}
    for name, values in categories.items():
        if name not in nullable and any(a[name] is None for a in attributes):
            raise ValueError(f"attributes[{name!r}] is None but {name!r} is not in nullable")
        labels[name] = np.array([len(values) if a[name] is None else list(values).index(a[name]) for a in attributes],
                                dtype=np.int64)
    return labels


def visible_attributes(attributes: Attributes) -> dict[str, str]:
    """The categories the image shows, with their values (the `None`s dropped)."""
    return {name: value for name, value in attributes.items() if value is not None}
