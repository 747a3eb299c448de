"""Do other MaskGIT sampler settings draw better faces from a trained model? The sweep behind the README's "What
limits it" (generation).

    PYTHONPATH=src python docs/diagnostics/sampler_sweep.py src/transformers_f2ace/pretrained/unif2ace-synthface [--num 64]
        [--settings '[{}, {"guidance_scale": 1.25}]']

For each setting (keyword arguments of `generate_images`; `{}` is the model config's defaults), generates one face
per caption of the first `--num` *validation* faces (the test split stays for `unif2ace eval`), seeded alike, and
prints the judge's attribute accuracy against the captions' attributes and the Fréchet distance of the judge's
features to the real validation faces.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_f2ace.evaluation import FaceJudge, frechet_distance
from transformers_f2ace.recipe import judged_accuracy, synthface_examples

JUDGE_DIR = "src/transformers_f2ace/pretrained/synthface-judge"
SETTINGS = [
    {},
    {"guidance_scale": 3.0},
    {"guidance_scale": 5.0},
    {"guidance_scale": 8.0},
    {"guidance_scale": 3.0, "sample_temperature": 0.7},
    {"guidance_scale": 3.0, "temperature": 0.3},
    {"guidance_scale": 3.0, "num_inference_steps": 32},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", type=json.loads, default=SETTINGS, help="a JSON list of keyword-argument dicts")
    args = parser.parse_args()
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    judge = FaceJudge.from_pretrained(JUDGE_DIR)
    examples = synthface_examples(args.num, model.config.vq_config.resolution, seed=0, split="validation")
    real = judge.embed([example["image"] for example in examples])
    for setting in args.settings:
        start, generator, faces = time.perf_counter(), torch.Generator().manual_seed(0), []
        for first in range(0, args.num, args.batch_size):
            prompts = [example["caption"] for example in examples[first:first + args.batch_size]]
            faces += model.generate_images(**processor(text=prompts, return_tensors="pt"), generator=generator,
                                           progress=False, **setting)
        accuracy = judged_accuracy(judge, faces, examples)["overall"]
        distance = float(frechet_distance(judge.embed(faces), real))
        print(f"{json.dumps(setting)}: judge {accuracy:.3f}, Fréchet {distance:.0f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
