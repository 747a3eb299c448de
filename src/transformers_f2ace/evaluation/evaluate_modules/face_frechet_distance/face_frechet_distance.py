"""Local `evaluate` module: Fréchet distance between generated and real faces in the SynthFace judge's features.

    metric = evaluate.load("src/transformers_f2ace/evaluation/metrics/face_frechet_distance")
    metric.compute(predictions=generated_images, references=real_images)
"""

import datasets
import evaluate

from transformers_f2ace.evaluation import FaceJudge, frechet_distance


_DESCRIPTION = """Fréchet distance of Gaussians fitted to the judge's penultimate features of two image sets
(generated = predictions, real = references; the two lists must have the same length, evaluate's rule). Lower is
closer; two disjoint sets of real faces give the floor."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of PIL images (generated faces).
    references: list of PIL images (real faces), same count.
    judge_path: folder of a judge saved by `FaceJudge.save_pretrained` (default: the committed judge).
Returns:
    frechet_distance (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FaceFrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, judge_path=None):
        judge = FaceJudge.from_pretrained(judge_path)
        return {"frechet_distance": frechet_distance(judge.embed(predictions), judge.embed(references))}
