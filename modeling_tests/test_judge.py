"""The SynthFace attribute judge and the generation metrics (attribute accuracy, Fréchet distance, evaluate)."""

import json
import os

import numpy as np
import pytest
import torch

from transformers_f2ace.data import ATTRIBUTES, make_example, render_face, validate_attributes
from transformers_f2ace.evaluation import (
    DEFAULT_JUDGE_PATH,
    METRICS_PATH,
    NULLABLE,
    FaceJudge,
    FaceJudgeConfig,
    attribute_accuracy,
    bootstrap_interval,
    frechet_distance,
)


NUM_TEST_FACES = 200


@pytest.fixture(scope="module")
def judge() -> FaceJudge:
    return FaceJudge.from_pretrained()


@pytest.fixture(scope="module")
def test_faces():
    examples = [make_example("test", index) for index in range(NUM_TEST_FACES)]
    return [e["image"] for e in examples], [e["attributes"] for e in examples]


def test_committed_judge_is_small_safetensors():
    assert sorted(os.listdir(DEFAULT_JUDGE_PATH)) >= ["config.json", "model.safetensors"]
    assert os.path.getsize(os.path.join(DEFAULT_JUDGE_PATH, "model.safetensors")) < 3 * 2**20


def test_committed_judge_accuracy_on_test_split(judge, test_faces):
    images, attributes = test_faces
    report = attribute_accuracy(judge.predict(images), attributes, include_hidden=True)
    assert report["num_scored"] == NUM_TEST_FACES * len(ATTRIBUTES)
    assert report["accuracy"] >= 0.98, report
    worst = min(report["per_category"].items(), key=lambda item: item[1])
    assert worst[1] >= 0.95, f"worst category {worst}"


@pytest.mark.parametrize("category", ["hat_colour", "smiling", "glasses", "background", "beard"])
def test_judge_tells_apart_faces_differing_in_one_attribute(judge, category):
    base = {
        "face_shape": "oval", "skin_tone": "light", "hair_colour": "black", "bald": "no", "hair_length": "medium",
        "hair_style": "straight", "bangs": "no", "eye_colour": "blue", "eyes_closed": "no", "eyebrows": "thick",
        "eyebrows_raised": "no", "beard": "none", "moustache": "no", "stubble": "no", "glasses": "none",
        "sunglasses": "no", "hat": "cap", "hat_colour": "red", "earrings": "none", "mask": "no",
        "lipstick": "none", "blush": "no", "smiling": "no", "mouth_open": "no", "background": "grey",
    }
    changed = {"hat_colour": "blue", "smiling": "yes", "glasses": "round", "background": "green", "beard": "full"}
    variant = dict(base, **{category: changed[category]})
    if category == "beard":
        variant["stubble"] = None  # a full beard hides stubble
    for a in (base, variant):
        validate_attributes(a)
    first, second = judge.predict([render_face(base), render_face(variant)])
    assert first[category] == base[category]
    assert second[category] == variant[category]


def test_judge_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FaceJudge(FaceJudgeConfig(channels=(4, 8), feature_dim=8)).eval()
    model.save_pretrained(str(tmp_path))
    loaded = FaceJudge.from_pretrained(str(tmp_path))
    pixels = torch.rand(2, 3, 64, 64)
    for name, logits in model(pixels).items():
        torch.testing.assert_close(loaded(pixels)[name], logits)
    assert loaded(pixels)["hair_length"].shape == (2, len(ATTRIBUTES["hair_length"]) + 1)  # + "not visible"
    assert loaded(pixels)["skin_tone"].shape == (2, len(ATTRIBUTES["skin_tone"]))
    with pytest.raises(ValueError, match="no config.json"):
        FaceJudge.from_pretrained(str(tmp_path / "missing"))


def test_nullable_covers_every_hidden_category():
    hidden = {name for i in range(300) for name, v in make_example("train", i)["attributes"].items() if v is None}
    assert hidden <= set(NULLABLE)


def test_encode_decode_labels_round_trip():
    model = FaceJudge(FaceJudgeConfig(channels=(4,), feature_dim=4))
    attributes = [make_example("train", i)["attributes"] for i in range(20)]
    labels = model.encode_labels(attributes)
    logits = {name: torch.nn.functional.one_hot(index, model.config.num_classes(name)).float()
              for name, index in labels.items()}
    assert model.decode(logits) == attributes


def test_attribute_accuracy_matches_hand_computation():
    predictions = [{"hat": "cap", "smiling": "yes", "beard": None}, {"hat": "none", "smiling": "no", "beard": "full"}]
    targets = [{"hat": "cap", "smiling": "no"}, {"hat": "none", "beard": None}]
    # Scored pairs: (cap=cap ✓, yes≠no ✗), (none=none ✓); image 2's beard target is None, skipped.
    report = attribute_accuracy(predictions, targets)
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_category"] == {"hat": 1.0, "smiling": 0.0}
    assert report["exact_match"] == 0.5
    assert report["num_scored"] == 3
    assert report["image_hits"] == [1, 1] and report["image_scored"] == [2, 1]
    # With hidden targets scored, image 2's beard (predicted "full", target not visible) is a miss.
    hidden = attribute_accuracy(predictions, targets, include_hidden=True)
    assert hidden["accuracy"] == pytest.approx(2 / 4)
    assert hidden["per_category"]["beard"] == 0.0
    assert hidden["exact_match"] == 0.0
    assert hidden["image_hits"] == [1, 1] and hidden["image_scored"] == [2, 2]
    with pytest.raises(ValueError, match="same length"):
        attribute_accuracy(predictions, targets[:1])


def test_bootstrap_interval_resamples_clusters():
    # Two faces of one question each, A answered right and B wrong: a resample holds A twice (accuracy 1), B twice
    # (0) or both (0.5), with chances 1/4, 1/4, 1/2, so the 95% interval spans [0, 1].
    assert bootstrap_interval([1, 0], [1, 1]) == (0.0, 1.0)
    # Every face at the same accuracy: no spread, whatever the resample.
    assert bootstrap_interval([3, 6, 9], [4, 8, 12]) == pytest.approx((0.75, 0.75))
    # Clusters, not items, are resampled: 40 faces of 25 questions each, half the faces all right and half all wrong,
    # vary like 40 coin flips (standard error 0.079), far more than 1,000 independent answers would (0.016).
    low, high = bootstrap_interval([25] * 20 + [0] * 20, [25] * 40)
    assert low < 0.5 < high and high - low > 4 * 0.079 * 0.8
    # ... and the interval narrows as faces are added
    wider, narrower = (bootstrap_interval([1, 0] * n, [1, 1] * n) for n in (20, 500))
    assert narrower[1] - narrower[0] < (wider[1] - wider[0]) / 3
    for hits, counts in (([1], [1, 1]), ([], []), ([0, 0], [0, 0])):
        with pytest.raises(ValueError, match="hits and counts"):
            bootstrap_interval(hits, counts)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1], [1], confidence=1.0)


def test_frechet_distance_identical_symmetric_and_positive():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    b = rng.normal(size=(400, 6)) + 0.5
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 6 * 0.5**2 * 0.8
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(a, b[:, :3])


def test_frechet_distance_closed_form_1d_and_diagonal():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, size=(300, 1))
    y = rng.normal(-1.0, 0.5, size=(250, 1))
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2, with sample means and unbiased standard deviations.
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # Diagonal Gaussians: the distance is the sum of the 1-D distances. Two zero-mean, orthogonal +-1 (Walsh)
    # columns make the sample covariances exactly diagonal.
    walsh = np.array([[1, -1, 1, -1], [1, 1, -1, -1]], dtype=float).T  # (4, 2)
    u = walsh * np.array([2.0, 0.5]) + np.array([1.0, 3.0])
    v = walsh * np.array([1.0, 1.5]) + np.array([0.0, 0.0])
    expected = sum((u[:, k].mean() - v[:, k].mean()) ** 2 + (u[:, k].std(ddof=1) - v[:, k].std(ddof=1)) ** 2
                   for k in range(2))
    assert frechet_distance(u, v) == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def evaluate_offline():
    evaluate = pytest.importorskip("evaluate")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return evaluate


def test_attribute_accuracy_evaluate_module(evaluate_offline, judge, test_faces):
    images, attributes = test_faces[0][:16], test_faces[1][:16]
    metric = evaluate_offline.load(os.path.join(METRICS_PATH, "face_attribute_accuracy"))
    result = metric.compute(predictions=images, references=[json.dumps(a) for a in attributes])
    assert result == attribute_accuracy(judge.predict(images), attributes)


def test_frechet_evaluate_module_and_real_floor(evaluate_offline, judge, test_faces):
    images = test_faces[0]
    half = len(images) // 2
    metric = evaluate_offline.load(os.path.join(METRICS_PATH, "face_frechet_distance"))
    result = metric.compute(predictions=images[:half], references=images[half:])
    expected = frechet_distance(judge.embed(images[:half]), judge.embed(images[half:]))
    assert result["frechet_distance"] == pytest.approx(expected, rel=1e-6)
    # Real-vs-real is the floor: colour-inverted faces are much farther from real ones than real faces are.
    inverted = [image.point(lambda v: 255 - v) for image in images[:half]]
    assert frechet_distance(judge.embed(inverted), judge.embed(images[half:])) > 2 * expected
