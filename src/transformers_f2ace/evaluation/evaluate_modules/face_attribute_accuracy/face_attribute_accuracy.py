"""Local `evaluate` module: attribute accuracy of faces as judged by the SynthFace attribute judge.

    metric = evaluate.load("src/transformers_f2ace/evaluation/metrics/face_attribute_accuracy")
    metric.compute(predictions=images, references=[json.dumps(attributes) for attributes in targets])
"""

import json

import datasets
import evaluate

from transformers_f2ace.evaluation import FaceJudge, attribute_accuracy


_DESCRIPTION = """Share of (image, category) pairs where the SynthFace judge sees the target value. Predictions are
generated faces (PIL images), references the target attribute dicts as JSON strings (only their keys are scored;
`null` targets are skipped unless include_hidden=True)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of PIL images (any size; resized to the judge's input).
    references: list of JSON strings, one target attribute dict per image.
    judge_path: folder of a judge saved by `FaceJudge.save_pretrained` (default: the committed judge).
    include_hidden: score `null` targets as "not visible" (default False).
Returns:
    accuracy, exact_match, per_category (dict), num_scored, image_hits and image_scored (per image).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FaceAttributeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, judge_path=None, include_hidden=False):
        judge = FaceJudge.from_pretrained(judge_path)
        targets = [json.loads(reference) for reference in references]
        return attribute_accuracy(judge.predict(predictions), targets, include_hidden=include_hidden)
