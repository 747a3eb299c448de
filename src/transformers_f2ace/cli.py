"""The `unif2ace` command line: demo | generate | describe | convert | push | train | eval."""

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


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert_showo_folder, convert_unif2ace_folder

    try:
        if args.reverse:
            folder = convert_unif2ace_folder(args.src, args.dst, upcycle=args.upcycle)
            print(f"Wrote the Show-o checkpoint {folder.resolve()} (model.safetensors, config.json, phi/config.json)")
            return 0
        error = convert_showo_folder(
            args.src, args.dst, upcycle=args.upcycle, allow_pickle=args.allow_pickle, config=args.config,
            num_attention_heads=args.num_attention_heads, vq=args.vq, block_style=args.block_style, seed=args.seed,
        )
    except ValueError as problem:
        raise SystemExit(f"unif2ace convert: {problem}")
    print(f"Dense-equivalence check: max |token MoE with every routed expert on - Show-o MLP| = {error:.1e} (float64)")
    print(f"Wrote the UniF²ace checkpoint {Path(args.dst).resolve()}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import DEFAULT_COMMIT_MESSAGE, HubUploadError, upload_checkpoint

    try:
        info = upload_checkpoint(args.folder, args.repo_id, revision=args.revision, private=args.private,
                                 commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
                                 base_model=args.base_model)
    except (HubUploadError, PermissionError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"unif2ace push: {error}")
    print(f"Pushed {args.folder} to {args.repo_id} ({args.revision or 'main'}) in commit {info.oid}: {info.commit_url}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipe import RecipeArguments, run_recipe

    try:
        recipe = RecipeArguments(
            output_dir=args.output_dir, stage=args.stage, config=args.config, seed=args.seed, num_train=args.num_train,
            vq_steps=args.vq_steps, vq_batch_size=args.vq_batch_size, vq_lr=args.vq_lr, vq_bf16=args.vq_bf16,
            vq_warmup_steps=args.vq_warmup_steps, vq_dir=args.vq_dir, semantic_steps=args.semantic_steps,
            semantic_batch_size=args.semantic_batch_size, semantic_lr=args.semantic_lr, model_steps=args.model_steps,
            batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            adam_beta2=args.adam_beta2, t2i_fraction=args.t2i_fraction, describe_fraction=args.describe_fraction,
            questions_per_record=args.questions_per_record, mix_tasks=not args.no_mix_tasks, save_steps=args.save_steps,
            logging_steps=args.logging_steps, resume=args.resume, progress=not args.no_progress,
            d3diff_alpha=args.d3diff_alpha, moe=not args.no_moe,
        )
        result = run_recipe(recipe)
    except ValueError as error:
        raise SystemExit(f"unif2ace train: {error}")
    if result.vq_dir is not None:
        print(f"Image tokenizer: {result.vq_dir.resolve()}")
    if result.semantic_probe is not None:
        print(f"Semantic encoder: attribute probe accuracy {result.semantic_probe['overall']:.3f} (validation faces)")
    if result.final_dir is not None:
        print(f"Model and processor ({result.global_step} steps): {result.final_dir.resolve()}")
    print("Wall time: " + ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in result.seconds.items()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .recipe import markdown_table, run_eval, write_model_card

    try:
        report = run_eval(args.model_dir, num=args.num, split=args.split, judge_dir=args.judge, steps=args.steps,
                          seed=args.seed, max_new_tokens=args.max_new_tokens)
    except ValueError as error:
        raise SystemExit(f"unif2ace eval: {error}")
    print(markdown_table(report))
    if args.json:
        output = Path(args.json)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"Wrote {output.resolve()}")
    if args.card:
        print(f"Model card with these metrics: {write_model_card(args.model_dir, report, args.card).resolve()}")
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

    convert = commands.add_parser("convert", help="Show-o (Phi-1.5) checkpoint -> UniF²ace (upcycled MoE), or back")
    convert.add_argument("src", help="Show-o folder / .safetensors / index.json (with --reverse: a UniF²ace folder)")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--upcycle", choices=("slice", "copy"), default="slice",
                         help="slice the dense MLP into the experts (default) or copy it into every expert")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read a trusted pickle checkpoint (pytorch_model.bin) with torch.load(weights_only=True)")
    convert.add_argument("--reverse", action="store_true", help="UniF²ace -> Show-o (an upcycled, untrained MoE only)")
    convert.add_argument("--config", help="UniF²ace config.json or folder to convert into (default: derived)")
    convert.add_argument("--num-attention-heads", type=int, default=32, help="for a derived config (Phi-1.5: 32)")
    convert.add_argument("--vq", help="a UniF2aceVQModel folder to keep (Show-o's MAGVIT-v2 cannot be converted)")
    convert.add_argument("--block-style", choices=("parallel", "sequential"),
                         help="override; sequential is accepted but not equivalent to Show-o")
    convert.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised new modules")
    convert.set_defaults(run=_convert)

    push = commands.add_parser(
        "push", help="upload a saved checkpoint folder (adapters in it included) to the Hub in one commit",
        description="Uploads every file of FOLDER in one commit; renders a model card when FOLDER has no README.md. "
                    "The token comes from HF_TOKEN or `hf auth login` (never from the command line).")
    push.add_argument("folder", help="a folder written by save_pretrained (a model, or a PEFT adapter)")
    push.add_argument("repo_id", help="the Hub repo, namespace/name (created when missing)")
    push.add_argument("--revision", "--branch", dest="revision",
                      help="the branch to commit to, created from main when missing (default: main)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                             "visibility)")
    push.add_argument("--commit-message", help="the commit title")
    push.add_argument("--base-model", help="Hub id of the base model, for the card (required for an adapter whose "
                                           "config names a local base)")
    push.set_defaults(run=_push)

    from .recipe import RecipeArguments

    defaults = RecipeArguments(output_dir="")  # the recipe's defaults, shown by --help
    train = commands.add_parser(
        "train", help="train the default model on SynthFace: the VQ tokenizer, then UniF²ace (MMU + T2I)",
        description="Stage vq trains the image tokenizer (OUTPUT_DIR/vq); stage model trains UniF²ace on mixed "
                    "caption -> face and face + question -> answer records, checkpointing to OUTPUT_DIR/checkpoints, "
                    "and saves the model with its processor to OUTPUT_DIR/final.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("output_dir", help="the run folder")
    train.add_argument("--stage", choices=("vq", "model", "all"), default=defaults.stage, help="which stages to run")
    train.add_argument("--config", choices=("small", "tiny"), default=defaults.config,
                       help="UniF2aceConfig preset (small: 64 px, 16x16 tokens, 1024 codes; tiny: for tests)")
    train.add_argument("--num-train", type=int, default=defaults.num_train, help="SynthFace training faces")
    train.add_argument("--vq-steps", type=int, default=defaults.vq_steps, help="tokenizer training steps")
    train.add_argument("--vq-batch-size", type=int, default=defaults.vq_batch_size, help="images per tokenizer step")
    train.add_argument("--vq-lr", type=float, default=defaults.vq_lr, help="tokenizer AdamW learning rate")
    train.add_argument("--vq-warmup-steps", type=int, default=defaults.vq_warmup_steps,
                       help="tokenizer warm-up steps (then cosine decay)")
    train.add_argument("--vq-bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for the tokenizer's forward, which trains on the CPU (default: where oneDNN "
                            "has bf16 kernels for it, AVX-512 CPUs)")
    train.add_argument("--vq-dir", help="stage model only: use the tokenizer trained by another run (its vq folder)")
    train.add_argument("--semantic-steps", type=int, default=defaults.semantic_steps,
                       help="attribute pretraining steps of the semantic (CLIP) encoder before stage model (0: keep "
                            "it random)")
    train.add_argument("--semantic-batch-size", type=int, default=defaults.semantic_batch_size,
                       help="faces per semantic-encoder step")
    train.add_argument("--semantic-lr", type=float, default=defaults.semantic_lr,
                       help="semantic-encoder peak learning rate (one cycle)")
    train.add_argument("--model-steps", type=int, default=defaults.model_steps, help="model optimizer steps")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="records per model step")
    train.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (cosine decay)")
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    train.add_argument("--adam-beta2", type=float, default=defaults.adam_beta2,
                       help="AdamW second-moment decay")
    train.add_argument("--t2i-fraction", type=float, default=defaults.t2i_fraction,
                       help="share of generation records; the rest are understanding records")
    train.add_argument("--describe-fraction", type=float, default=defaults.describe_fraction,
                       help="share of understanding records that ask 'Describe the face.'")
    train.add_argument("--questions-per-record", type=int, default=defaults.questions_per_record,
                       help="attribute questions per understanding conversation")
    train.add_argument("--no-mix-tasks", action="store_true",
                       help="group each step's records by length alone (mostly one task per step) instead of one "
                            "micro-batch per task")
    train.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps")
    train.add_argument("--logging-steps", type=int, default=defaults.logging_steps, help="log losses every N steps")
    train.add_argument("--seed", type=int, default=defaults.seed, help="dataset, initialisation and mask seed")
    train.add_argument("--resume", action="store_true",
                       help="keep a trained OUTPUT_DIR/vq and continue from the last checkpoint in OUTPUT_DIR/checkpoints")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--d3diff-alpha", type=float, default=None,
                       help="ablation: weight of the D3Diff score term (default: the preset's; 0 = mask-only loss)")
    train.add_argument("--no-moe", action="store_true",
                       help="ablation: dense MLPs and no sequence-level experts instead of both MoE levels")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="VQA accuracy per attribute, caption recall and (with --judge) generation metrics on SynthFace",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("model_dir", help="a checkpoint folder with its processor")
    evaluate.add_argument("--num", type=int, default=50, help="held-out faces")
    evaluate.add_argument("--split", choices=("train", "validation", "test"), default="test")
    evaluate.add_argument("--json", help="also write the report as JSON to this file")
    evaluate.add_argument("--judge", help="a FaceJudge folder (e.g. transformers_f2ace/pretrained/synthface-judge); "
                                          "without it the generation metrics are skipped")
    evaluate.add_argument("--steps", type=int, default=None, help="MaskGIT steps (default: the model config's)")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, help="answer length bound")
    evaluate.add_argument("--seed", type=int, default=0, help="dataset and sampling seed")
    evaluate.add_argument("--card", metavar="REPO_ID",
                          help="also write MODEL_DIR/README.md: the model card (usage for REPO_ID) with these metrics")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
