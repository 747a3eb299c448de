"""How well does an image tokenizer keep the attributes? The tokenizer arms behind the README's "What limits it".

    PYTHONPATH=src python docs/diagnostics/tokenizer_arm.py runs/vqarms/bf16 --steps 600 --bf16 [--lr 2e-3]
        [--set num_res_blocks=2] [--num 200] [--split validation]
    PYTHONPATH=src python docs/diagnostics/tokenizer_arm.py runs/main/vq --existing      # evaluate a trained one

Trains the small preset's tokenizer from scratch as the recipe's stage vq does (seed 0, 12,000 training faces, batch
16, 50 warm-up steps, cosine decay; `--set` overrides a `UniF2aceVQConfig` field, the value parsed as JSON), saves it
to the folder, then reports the wall time, the mean squared error of the reconstructions of the first `--num` faces
of `--split` (pixels in [-1, 1]) and the judge's attribute accuracy on those reconstructions — the ceiling of
generation accuracy (`unif2ace eval` reports the same on its test faces as `tokenizer_ceiling`).
"""

import argparse
import json
import time

import torch
from PIL import Image

from transformers_f2ace.evaluation import DEFAULT_JUDGE_PATH, FaceJudge
from transformers_f2ace.modeling_unif2ace_vq import UniF2aceVQModel
from transformers_f2ace.recipe import (RecipeArguments, face_pixels, judged_accuracy, recipe_config,
                                       synthface_examples)
from transformers_f2ace.training.vq import train_vq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--existing", action="store_true", help="evaluate the tokenizer in the folder, train nothing")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the recipe's --vq-bf16)")
    parser.add_argument("--set", nargs="*", default=[], help="UniF2aceVQConfig overrides, e.g. num_res_blocks=2")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    seconds = None
    if args.existing:
        vq = UniF2aceVQModel.from_pretrained(args.folder)
    else:
        config = recipe_config(RecipeArguments(output_dir=args.folder)).vq_config
        for item in args.set:
            name, value = item.split("=", 1)
            setattr(config, name, json.loads(value))
        torch.manual_seed(0)
        vq = UniF2aceVQModel(config)
        images = face_pixels(synthface_examples(12000, config.resolution, seed=0))
        start = time.perf_counter()
        train_vq(vq, images, steps=args.steps, lr=args.lr, batch_size=16, seed=0, lr_schedule="cosine",
                 warmup_steps=50, autocast_dtype=torch.bfloat16 if args.bf16 else None)
        seconds = time.perf_counter() - start
        vq.save_pretrained(args.folder)
    faces = synthface_examples(args.num, vq.config.resolution, seed=0, split=args.split)
    pixels = face_pixels(faces).float() / 127.5 - 1.0
    with torch.no_grad():
        reconstructed = vq.eval().decode(vq.encode(pixels))
    error = float(((reconstructed - pixels) ** 2).mean())
    images = [Image.fromarray(array) for array in
              ((reconstructed + 1.0) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
    accuracy = judged_accuracy(FaceJudge.from_pretrained(DEFAULT_JUDGE_PATH), images, faces)
    timing = f"{seconds:.0f} s of training, " if seconds is not None else ""
    print(f"{args.folder}: {timing}reconstruction MSE {error:.4f}, judge {accuracy['overall']:.3f} on the first "
          f"{args.num} {args.split} faces")
    print(json.dumps({name: round(value, 3) for name, value in accuracy.items()}))


if __name__ == "__main__":
    main()
