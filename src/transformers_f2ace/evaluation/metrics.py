"""Generation metrics in the judge's terms: attribute accuracy of images, and a Fréchet distance of judge features."""

from typing import Optional, Sequence

import numpy as np


def attribute_accuracy(predictions: Sequence[dict], targets: Sequence[dict], include_hidden: bool = False) -> dict:
    """Share of (image, category) pairs whose predicted value equals the target value.

    Args:
        predictions: one predicted attribute dict per image (e.g. `FaceJudge.predict`; `None` = not visible).
        targets: one target dict per image (e.g. a prompt's attributes); only its keys are scored.
        include_hidden: if True a `None` target is scored too (the judge must say "not visible"); if False
            `None` targets are skipped.

    Returns:
        `accuracy` (mean over scored pairs), `exact_match` (share of images with every scored category right),
        `per_category` (category -> accuracy), `num_scored` (number of scored pairs), `image_hits` and
        `image_scored` (per image: right and scored pairs; for a [`bootstrap_interval`] over images).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"predictions ({len(predictions)}) and targets ({len(targets)}) must have the same length")
    hits: dict[str, list[bool]] = {}
    image_hits, image_scored = [], []
    for predicted, target in zip(predictions, targets):
        verdicts = []  # this image's scored categories: right or not
        for name, value in target.items():
            if value is None and not include_hidden:
                continue
            if name not in predicted:
                raise ValueError(f"predictions lack category {name!r} of the targets")
            verdicts.append(predicted[name] == value)
            hits.setdefault(name, []).append(verdicts[-1])
        image_hits.append(int(sum(verdicts)))
        image_scored.append(len(verdicts))
    scored = [hit for values in hits.values() for hit in values]
    return {
        "accuracy": float(np.mean(scored)) if scored else float("nan"),
        "exact_match": float(np.mean([h == n for h, n in zip(image_hits, image_scored)])) if targets else float("nan"),
        "per_category": {name: float(np.mean(values)) for name, values in hits.items()},
        "num_scored": len(scored),
        "image_hits": image_hits,
        "image_scored": image_scored,
    }


def bootstrap_interval(hits: Sequence[int], counts: Sequence[int], confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the micro-averaged accuracy `sum(hits) / sum(counts)` of items that come in
    clusters (all the questions about one face, all the attributes of one generated face): the clusters are
    resampled, not the items, since the items of one cluster are not independent. `hits[i]`, `counts[i]`: right and
    scored items of cluster i. Returns (low, high)."""
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if hits.shape != counts.shape or hits.ndim != 1 or not len(hits) or counts.sum() <= 0:
        raise ValueError(f"hits and counts must be equal-length 1-D with some items, got {hits.shape}, {counts.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    draws = np.random.default_rng(seed).integers(0, len(hits), (resamples, len(hits)))
    totals = counts[draws].sum(1)
    accuracies = hits[draws].sum(1)[totals > 0] / totals[totals > 0]
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(accuracies, tail)), float(np.percentile(accuracies, 100 - tail))


def _sqrtm_product_trace(a: np.ndarray, b: np.ndarray) -> float:
    """trace(sqrtm(a @ b)) for symmetric PSD a, b, via eigen-decompositions: sqrt(a) b sqrt(a) is symmetric PSD
    and has the same eigenvalues as a @ b."""
    values, vectors = np.linalg.eigh(a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root_a @ b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of a (n, d) feature array (n >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be a 2-D array with at least 2 rows, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: Optional[float] = None) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (n_a, d) and (n_b, d):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)).

    The matrix square root uses symmetric eigen-decompositions (numpy only); `eps`, if given, is added to both
    covariance diagonals first.
    """
    mu_a, sigma_a = gaussian_statistics(features_a)
    mu_b, sigma_b = gaussian_statistics(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    if eps:
        sigma_a = sigma_a + eps * np.eye(len(mu_a))
        sigma_b = sigma_b + eps * np.eye(len(mu_b))
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b)
    return float(max(distance - 2 * _sqrtm_product_trace(sigma_a, sigma_b), 0.0))
