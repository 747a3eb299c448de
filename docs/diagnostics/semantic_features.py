"""Does a UniF²ace model use its semantic (CLIP) features? The diagnostics behind the README's "What limits it".

    PYTHONPATH=src python docs/diagnostics/semantic_features.py knockout src/transformers_f2ace/pretrained/unif2ace-synthface
    PYTHONPATH=src python docs/diagnostics/semantic_features.py mmu-run --vq-dir runs/main/vq [--projector perceiver]
        [--route learned] [--gate-bias 0] [--questions-per-record 10] [--steps 800]
        [--only-attribute smiling [mouth_open] --num-train 3000 --steps 150 --num 120]

`knockout`: VQA exact match on the first `--num` test faces with the model's semantic tower, then with the tower's
random initialisation (the recipe's seed-0 model) loaded over it; the largest change of the last logits when
`semantic_pixel_values` is dropped; and, on 16 validation conversations, the understanding group's sequence routes
per layer (how many conversations chose each expert, mean routing weight) and the mean feature-gate weight w of the
hidden state on the image span for each feature expert; the share of the CLIP resampler's output energy that varies
between 64 validation faces (0: a constant, whatever the face); and the majority-answer baseline's accuracy.
`mmu-run`: an understanding-only run of the recipe's model stage (pretrained tower, `--steps` steps on `--num-train`
faces, AdamW 1e-3, 25 warm-up steps, cosine), with the sequence-level options of the preset (`UniF2aceConfig.small`:
an MLP projector, every understanding sequence through (copy, CLIP) at 0.5 / 0.5, CLIP gates opened with bias
3.0) or, to reproduce the README's earlier runs, the paper's form: `--projector perceiver --route learned
--gate-bias 0` (the old `--open-gates` opened the CLIP gates only = `--gate-bias 3`, `--force-route` = `--route
fixed`, `--projector mlp` = the projector that is now `MlpProjector`); and another number of questions per
conversation; then `knockout` on the result. With `--only-attribute A [B ...]`,
every record asks one of those attributes' first question alone (face i: attribute i mod n), and the report is their
accuracy on validation faces.
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup

from transformers_f2ace import UniF2aceForConditionalGeneration
from transformers_f2ace.modeling_unif2ace_encoders import UniF2aceSequenceMoeBlock
from transformers_f2ace.data import ATTRIBUTES, conversation
from transformers_f2ace.data.text import QUESTIONS
from transformers_f2ace.configuration_unif2ace import RESAMPLER_TYPES
from transformers_f2ace.recipe import (PRESETS, RecipeArguments, answer_conversations, answer_prior, build_model,
                                       build_processor, evaluate_understanding, mixed_records, normalise_answer,
                                       pretrain_semantic_encoder, synthface_examples)
from transformers_f2ace.training import UniF2aceDataCollator

FIXED_ROUTE = ["copy", "clip"]
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "semantic_pixel_values", "identity_pixel_values")


@torch.no_grad()
def image_dependent_share(model, processor) -> float:
    """Share of the CLIP resampler output's energy that varies between 64 validation faces."""
    faces = synthface_examples(64, model.config.vq_config.resolution, 0, "validation")
    pixels = processor.image_processor([face["image"] for face in faces], return_tensors="pt")["semantic_pixel_values"]
    encoders = model.model.feature_encoders
    features = encoders.resamplers["clip"](encoders.semantic_features(pixels))
    return float((features - features.mean(0)).pow(2).mean() / features.pow(2).mean())


def sequence_blocks(model):
    return [module for module in model.modules() if isinstance(module, UniF2aceSequenceMoeBlock)]


@torch.no_grad()
def routes_and_gates(model, processor) -> list[dict]:
    """Per layer: expert kind -> (conversations that chose it, mean weight), and feature kind -> mean gate w."""
    records = mixed_records(synthface_examples(16, model.config.vq_config.resolution, 0, "validation"), 0.0, 0.0, 4)
    batch = UniF2aceDataCollator.from_config(processor, model.config, seed=0)(records)
    seen = []

    def record(block, args, kwargs, output):
        hidden, features = args[0], (args[3] if len(args) > 3 else kwargs.get("features")) or {}
        weights, index = output[2]
        kinds = block.expert_kinds[: block.experts_per_group]
        layer = {"routes": {f"{e}:{kind}": [int((index == e).sum()), round(float(weights[index == e].mean()), 2)]
                            for e, kind in enumerate(kinds) if (index == e).any()}}
        for key, gate in block.feature_gates.items():
            kind = block.expert_kinds[int(key)]
            if int(key) < block.experts_per_group and kind in features:
                span = features[kind].abs().sum(-1) > 0
                layer[f"gate w {kind}"] = round(float(gate(hidden).float().softmax(-1)[..., 0][span].mean()), 3)
        seen.append(layer)

    hooks = [block.register_forward_hook(record, with_kwargs=True) for block in sequence_blocks(model)]
    try:
        model.model(**{name: batch[name] for name in MODEL_INPUTS if name in batch})
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def logit_change_without_semantic_view(model, processor, faces) -> float:
    conversations = [{"role": "user", "content": [{"type": "image", "image": face["image"]},
                                                  {"type": "text", "text": face["qa"][0]}]} for face in faces[:4]]
    inputs = processor.apply_chat_template([[turn] for turn in conversations], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    full = model(**inputs).logits[:, -1]
    without = model(**{k: v for k, v in inputs.items() if k != "semantic_pixel_values"}).logits[:, -1]
    return float((full - without).abs().max())


def knockout(model, processor, num: int) -> dict:
    model.eval()
    faces = synthface_examples(num, model.config.vq_config.resolution, 0, "test")
    understanding = evaluate_understanding(model, processor, faces, prior=answer_prior())
    report = {"routes_and_gates": routes_and_gates(model, processor),
              "max_logit_change_without_semantic_view": logit_change_without_semantic_view(model, processor, faces),
              "clip_feature_image_dependent_share": image_dependent_share(model, processor),
              "vqa_majority_answer_baseline": understanding["vqa_prior_overall"],
              "vqa_trained_tower": understanding["vqa_overall"],
              "vqa_trained_tower_per_attribute": understanding["vqa_accuracy"]}
    torch.manual_seed(0)
    initial = UniF2aceForConditionalGeneration(model.config).model.feature_encoders.semantic_encoder
    model.model.feature_encoders.semantic_encoder.load_state_dict(initial.state_dict())
    report["vqa_random_tower"] = evaluate_understanding(model, processor, faces)["vqa_overall"]
    return report


def single_question_accuracy(model, processor, attribute: str, num: int, question_first: bool) -> dict:
    """Greedy accuracy on `attribute`'s first question over the first `num` validation faces that show it, and the
    share of the most frequent answer among them."""
    model.eval()
    faces = [face for face in synthface_examples(num, model.config.vq_config.resolution, 0, "validation")
             if face["attributes"].get(attribute) is not None]
    question = QUESTIONS[attribute][0]
    hits = [normalise_answer(answer_conversations(model, processor, face["image"],
                                                  [asked(question, None, question_first)[:-1]], 4)[0])
            == normalise_answer(face["attributes"][attribute]) for face in faces]
    answers = [face["attributes"][attribute] for face in faces]
    return {"attribute": attribute, "faces": len(faces), "accuracy": float(np.mean(hits)),
            "majority_share": max(answers.count(value) for value in set(answers)) / len(answers)}


def asked(question: str, answer: str | None, question_first: bool) -> list[dict]:
    """A one-question conversation; `question_first`: the question also comes in a text-only user turn BEFORE the
    image, so that the image tokens (which attend to every earlier position) can depend on it."""
    messages = conversation(question, answer or "")
    return [{"role": "user", "content": [{"type": "text", "text": question}]}, *messages] if question_first else messages


def only_attribute_records(faces: list[dict], attributes: list[str], question_first: bool,
                           balanced: bool = False) -> list[dict]:
    """One single-question record per face that shows the attribute: face i asks `attributes[i % len]`. `balanced`:
    face i asks the first attribute from there on whose answer on this face is among the rarest so far for that
    attribute (the face is skipped if none is), so that every answer of every attribute is trained about equally."""
    counts = {name: collections.Counter({value: 0 for value in ATTRIBUTES[name]}) for name in attributes}
    records = []
    for index, face in enumerate(faces):
        start = index % len(attributes)
        shown = [name for name in attributes[start:] + attributes[:start] if face["attributes"].get(name) is not None]
        if balanced:
            shown = [name for name in shown if counts[name][face["attributes"][name]] == min(counts[name].values())]
        if not shown or (not balanced and shown[0] != attributes[start]):
            continue
        attribute, answer = shown[0], face["attributes"][shown[0]]
        counts[attribute][answer] += 1
        records.append({"image": face["image"], "messages": asked(QUESTIONS[attribute][0], answer, question_first)})
    return records


def mmu_run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as output:
        recipe = RecipeArguments(output_dir=output, stage="model", semantic_steps=args.semantic_steps, progress=False)
        route = None if args.route == "learned" else FIXED_ROUTE
        config = PRESETS[recipe.config](moe_config=dict(resampler_type=args.projector, mmu_fixed_sequence_route=route,
                                                        feature_gate_bias=args.gate_bias))
        faces = synthface_examples(args.num_train, config.vq_config.resolution, 0)
        processor = build_processor(config, faces)
        model = build_model(config, Path(args.vq_dir), 0)
        pretrain_semantic_encoder(recipe, model, processor, faces)
    if args.only_attribute is None:
        records = mixed_records(faces, 0.0, recipe.describe_fraction, args.questions_per_record)
    else:
        records = only_attribute_records(faces, args.only_attribute, args.question_first, args.balanced)
    collator = UniF2aceDataCollator.from_config(processor, config, seed=0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(25, args.steps), args.steps)
    order = np.random.default_rng(0).permutation(len(records) * (1 + 16 * args.steps // len(records))) % len(records)
    model.train()
    for step in range(args.steps):
        loss = model(**collator([records[i] for i in order[16 * step:16 * (step + 1)]])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    if args.only_attribute is not None:
        return [single_question_accuracy(model, processor, name, args.num, args.question_first)
                for name in args.only_attribute]
    return knockout(model, processor, args.num)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    knock = commands.add_parser("knockout")
    knock.add_argument("model_dir")
    run = commands.add_parser("mmu-run")
    run.add_argument("--vq-dir", required=True, help="a trained tokenizer (a recipe run's vq folder)")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--num-train", type=int, default=6000)
    run.add_argument("--semantic-steps", type=int, default=1500)
    preset = PRESETS[RecipeArguments.config]().moe_config
    run.add_argument("--projector", choices=RESAMPLER_TYPES, default=preset.resampler_type)
    run.add_argument("--route", choices=("learned", "fixed"),
                     default="learned" if preset.mmu_fixed_sequence_route is None else "fixed",
                     help=f"fixed: every understanding sequence takes {FIXED_ROUTE} at 0.5 / 0.5 in every layer")
    run.add_argument("--gate-bias", type=float, default=preset.feature_gate_bias,
                     help="moe_config.feature_gate_bias (0: the paper's bias-free gates)")
    run.add_argument("--questions-per-record", type=int, default=RecipeArguments.questions_per_record)
    run.add_argument("--only-attribute", choices=sorted(QUESTIONS), nargs="+",
                     help="train on these attributes' first questions alone, one per record (face i asks attribute "
                          "i mod n); report their accuracy on validation faces")
    run.add_argument("--balanced", action="store_true",
                     help="with --only-attribute: every answer of every attribute about equally often (see "
                          "`only_attribute_records`)")
    run.add_argument("--question-first", action="store_true",
                     help="with --only-attribute: ask each question also before the image (see `asked`)")
    for command in (knock, run):
        command.add_argument("--num", type=int, default=40, help="test (--only-attribute: validation) faces")
    args = parser.parse_args()
    if args.command == "knockout":
        model = AutoModelForImageTextToText.from_pretrained(args.model_dir)
        report = knockout(model, AutoProcessor.from_pretrained(args.model_dir), args.num)
    else:
        report = mmu_run(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
