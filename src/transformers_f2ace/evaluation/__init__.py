"""Measuring SynthFace generation: the attribute judge (`FaceJudge`), attribute accuracy and a Fréchet distance.

`METRICS_PATH` holds local `evaluate` modules (`evaluate.load(os.path.join(METRICS_PATH, "face_attribute_accuracy"))`).
"""

import os

from .judge import DEFAULT_JUDGE_PATH, NULLABLE, FaceJudge, FaceJudgeConfig
from .metrics import attribute_accuracy, bootstrap_interval, frechet_distance, gaussian_statistics


METRICS_PATH = os.path.join(os.path.dirname(__file__), "evaluate_modules")

__all__ = [
    "DEFAULT_JUDGE_PATH",
    "METRICS_PATH",
    "NULLABLE",
    "FaceJudge",
    "FaceJudgeConfig",
    "attribute_accuracy",
    "bootstrap_interval",
    "frechet_distance",
    "gaussian_statistics",
]
