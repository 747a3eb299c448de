r"""Train the SynthFace attribute judge on SynthFace train-split ground truth and report test accuracy.

    python -m transformers_f2ace.evaluation.train_judge \
        --output src/transformers_f2ace/pretrained/synthface-judge --threads 1

Faces are rendered on the fly by `make_example` (train split for training, test split for the report); the judge
never sees model outputs.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data import make_example
from ..training.optimizer_step import optimizer_step
from .judge import FaceJudge, FaceJudgeConfig
from .metrics import attribute_accuracy


def render_split(split: str, num_samples: int, size: int, seed: int = 0, desc: str = "") -> tuple[np.ndarray, list]:
    """First `num_samples` faces of a SynthFace split: uint8 array (n, size, size, 3) and attribute dicts."""
    images, attributes = [], []
    for index in tqdm(range(num_samples), desc=desc or f"render {split}"):
        example = make_example(split, index, size=size, seed=seed)
        images.append(np.asarray(example["image"], dtype=np.uint8))
        attributes.append(example["attributes"])
    return np.stack(images), attributes


def train(args: argparse.Namespace) -> dict:
    """Train, save to `args.output`, return the test-split report (per-category accuracy)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FaceJudgeConfig(image_size=args.image_size)
    model = FaceJudge(config)
    images, attributes = render_split("train", args.num_train, args.image_size, seed=args.data_seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    labels = model.encode_labels(attributes)
    steps = args.epochs * (len(pixels) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    start = time.time()
    model.train()
    with tqdm(total=steps, desc="train judge") as bar:
        for _ in range(args.epochs):
            order = torch.from_numpy(rng.permutation(len(pixels)))
            for step in range(len(pixels) // args.batch_size):
                batch = order[step * args.batch_size:(step + 1) * args.batch_size]
                x = pixels[batch].float() / 255.0
                x = (x + args.noise * torch.randn_like(x)).clamp(0, 1)
                logits = model(x)
                loss = sum(F.cross_entropy(logits[name], labels[name][batch]) for name in logits) / len(logits)
                optimizer_step(loss, optimizer, schedule, bar)
    train_seconds = time.time() - start
    model.eval()
    model.save_pretrained(args.output)
    test_images, test_attributes = render_split("test", args.num_test, args.image_size, seed=args.data_seed)
    report = attribute_accuracy(model.predict(list(test_images)), test_attributes, include_hidden=True)
    report.update(train_seconds=round(train_seconds, 1), num_train=args.num_train, epochs=args.epochs,
                  num_test=args.num_test)
    with open(os.path.join(args.output, "training_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for config.json + model.safetensors")
    parser.add_argument("--num-train", type=int, default=30000, help="train-split faces rendered")
    parser.add_argument("--num-test", type=int, default=2000, help="test-split faces scored at the end")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--noise", type=float, default=0.02, help="std of Gaussian pixel noise (pixels in [0, 1])")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="torch / shuffling seed")
    parser.add_argument("--data-seed", type=int, default=0, help="SynthFace dataset seed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    report = train(parser.parse_args(argv))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
