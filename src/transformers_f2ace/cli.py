"""The `unif2ace` command line: demo | generate | describe."""

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.output_dir), Path(args.model) if args.model else None, args.steps, args.seed,
                      progress=not args.no_progress)
    if not result.trained:
        print("NOTE: no trained checkpoint was found, so this demo runs a small UniF²ace with UNTRAINED random "
              "weights: every stage runs, but the answers and faces are noise.")
    print("Understanding (held-out SynthFace faces, top row of the grid):")
    for question, answer, truth in result.answers:
        print(f"  Q: {question}\n  A: {answer or '(empty)'}   (ground truth: {truth})")
    print("Generation (prompts: captions of the faces in the middle row; generated faces in the bottom row):")
    for prompt in result.prompts:
        print(f"  - {prompt}")
    print(f"Wrote {result.grid_path.resolve()} in {result.seconds:.1f} s")
    return 0


def _load(model: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .demo import EMBEDDED_MODEL_DIR

    path = model or EMBEDDED_MODEL_DIR
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .demo import image_grid

    model, processor = _load(args.model)
    inputs = processor(text=args.prompt, return_tensors="pt")
    images = model.generate_images(**inputs, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                   generator=torch.Generator().manual_seed(args.seed), progress=not args.no_progress)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid([images], cell=images[0].width)).save(output)
    print(f"Wrote {output.resolve()}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from PIL import Image

    model, processor = _load(args.model)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as error:
        raise SystemExit(f"unif2ace describe: cannot read image {args.image!r}: {error}")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unif2ace", description="UniF²ace: fine-grained face understanding and generation")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="answer questions about faces and draw faces from prompts (offline)")
    demo.add_argument("--output-dir", default="demo_output", help="where the PNG grid goes (default: demo_output)")
    demo.add_argument("--model", help="a checkpoint folder (default: the embedded model)")
    demo.add_argument("--steps", type=int, default=None, help="MaskGIT steps (default: the model config's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)

    generate = commands.add_parser("generate", help="text -> face image")
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument("--model", help="a checkpoint folder or Hub id (default: the embedded model)")
    generate.add_argument("--output", default="face.png")
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--no-progress", action="store_true")
    generate.set_defaults(run=_generate)

    describe = commands.add_parser("describe", help="answer a question about a face image")
    describe.add_argument("image", help="an image file")
    describe.add_argument("--question", default="Describe the face.")
    describe.add_argument("--model", help="a checkpoint folder or Hub id (default: the embedded model)")
    describe.add_argument("--max-new-tokens", type=int, default=64)
    describe.set_defaults(run=_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
