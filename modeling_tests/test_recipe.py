"""The training recipe (`unif2ace train`) and the evaluation (`unif2ace eval`) on the tiny preset, a few steps each."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_f2ace.cli import main
from transformers_f2ace.data import ATTRIBUTES, make_example, vqa_pairs
from transformers_f2ace.recipe import (
    DESCRIBE_QUESTION,
    SEMANTIC_PROBE_FILE,
    RecipeArguments,
    answer_prior,
    attribute_questions,
    build_model,
    caption_mentions,
    check_records_fit,
    cpu_bf16_supported,
    mixed_records,
    model_training_arguments,
    normalise_answer,
    recipe_config,
    run_recipe,
)

TINY_RUN = {"config": "tiny", "num_train": 16, "vq_steps": 2, "vq_batch_size": 8, "semantic_steps": 2,
            "semantic_batch_size": 8, "semantic_probe_faces": 8, "model_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
            "warmup_steps": 1, "progress": False}


def step_losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("recipe") / "run"
    return output, run_recipe(RecipeArguments(output_dir=str(output), **TINY_RUN))


def test_both_stages_run_and_final_folder_loads_through_auto_classes(tiny_run):
    output, result = tiny_run
    assert result.global_step == 4
    assert sorted(step_losses(result.log_history)) == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for loss in step_losses(result.log_history).values())
    assert sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    model = AutoModelForImageTextToText.from_pretrained(output / "final")
    processor = AutoProcessor.from_pretrained(output / "final")
    assert model.config.vq_config.resolution == 32
    assert not list((output / "final").glob("*.bin"))  # nothing pickled in the folder meant for the Hub
    assert len(processor.tokenizer) == model.config.vocab_size
    # the trained image tokenizer of stage 1 is the one inside the final model (frozen during stage 2)
    vq_weights = load_file(output / "vq" / "model.safetensors")
    for name, tensor in model.model.vq.state_dict().items():
        torch.testing.assert_close(tensor, vq_weights[name], rtol=0, atol=0)
    # the semantic encoder was pretrained before stage 2 (not the seed's initialisation) and stayed frozen after it
    probe = json.loads((output / "final" / SEMANTIC_PROBE_FILE).read_text())
    assert probe == result.semantic_probe and set(probe) == set(ATTRIBUTES) | {"overall"}
    assert all(0.0 <= value <= 1.0 for value in probe.values())
    initial = build_model(model.config, output / "vq", TINY_RUN.get("seed", 0)).model.feature_encoders
    checkpoint = load_file(output / "checkpoints" / "checkpoint-2" / "model.safetensors")
    for name, tensor in model.model.feature_encoders.semantic_encoder.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint[f"model.feature_encoders.semantic_encoder.{name}"], rtol=0,
                                   atol=0)
    assert any(not torch.equal(tensor, initial.semantic_encoder.state_dict()[name])
               for name, tensor in model.model.feature_encoders.semantic_encoder.state_dict().items())


def test_resume_continues_exactly_from_the_last_checkpoint(tiny_run, tmp_path):
    output, result = tiny_run
    resumed = tmp_path / "run"
    shutil.copytree(output, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    shutil.rmtree(resumed / "final")
    vq_before = (resumed / "vq" / "model.safetensors").read_bytes()
    # mark the checkpoint's logged loss of step 1: a resumed run keeps that history, a run from scratch would not
    state_path = resumed / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    next(entry for entry in state["log_history"] if entry.get("step") == 1)["loss"] = 123.0
    state_path.write_text(json.dumps(state))

    again = run_recipe(RecipeArguments(output_dir=str(resumed), resume=True, **TINY_RUN))
    assert again.global_step == 4
    assert "vq" not in again.seconds  # the trained tokenizer is kept
    assert (resumed / "vq" / "model.safetensors").read_bytes() == vq_before
    resumed_losses, original = step_losses(again.log_history), step_losses(result.log_history)
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    assert resumed_losses[1] == 123.0  # steps 1-2 come from the checkpoint's trainer state
    for step in (3, 4):  # the resumed steps see the same batches and masks as the uninterrupted run
        assert resumed_losses[step] == pytest.approx(original[step], rel=1e-4)
    assert (resumed / "final" / "model.safetensors").is_file()
    # the encoder came from the checkpoint, its probe from the run folder
    assert again.semantic_probe is None
    assert json.loads((resumed / "final" / SEMANTIC_PROBE_FILE).read_text()) == result.semantic_probe


def test_resume_without_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    output, _ = tiny_run
    shutil.copytree(output / "vq", tmp_path / "vq")  # a trained tokenizer, but no checkpoints yet
    with pytest.raises(ValueError, match="no checkpoint-"):
        run_recipe(RecipeArguments(output_dir=str(tmp_path), resume=True, **{**TINY_RUN, "stage": "model"}))


def test_conversations_too_long_for_the_model_fail_before_training(tiny_run, tmp_path):
    output, _ = tiny_run
    # 30 questions of ~10 tokens + 16 image tokens exceed the tiny preset's 256 positions
    args = RecipeArguments(output_dir=str(tmp_path), **{**TINY_RUN, "stage": "model", "vq_dir": str(output / "vq"),
                                                         "questions_per_record": 30, "describe_fraction": 0.0})
    with pytest.raises(ValueError, match="before training: A sequence has .* tokens.*lower questions_per_record"):
        run_recipe(args)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / SEMANTIC_PROBE_FILE).exists()
    # with the recipe's 4 questions the same faces fit
    processor = AutoProcessor.from_pretrained(tmp_path / "processor")
    faces = [make_example("train", index, size=32) for index in range(16)]
    for t2i_fraction in (0.5, 0.0, 1.0):  # both kinds, understanding only, generation only
        check_records_fit(mixed_records(faces, t2i_fraction, 0.0, 4), processor, recipe_config(args))


def test_answer_prior_is_the_majority_answer_of_training_faces():
    prior = answer_prior(num=300)
    # rare accessories and features are mostly absent, so "no" / "none" is their majority answer
    assert prior["bald"] == prior["sunglasses"] == prior["mask"] == "no"
    assert prior["glasses"] == prior["hat"] == "none"
    assert {"eye_colour", "hair_colour", "skin_tone", "expression"} <= set(prior)
    # the prior of a balanced category is one of its values
    assert prior["skin_tone"] in ATTRIBUTES["skin_tone"]
    with pytest.raises(ValueError):
        answer_prior(num=0)


def test_eval_cli_writes_table_and_json_with_scores_in_unit_interval(tiny_run, tmp_path, capsys):
    from transformers_f2ace.evaluation import FaceJudge, FaceJudgeConfig

    output, _ = tiny_run
    judge_dir = tmp_path / "judge"
    torch.manual_seed(0)
    FaceJudge(FaceJudgeConfig(image_size=32, channels=(4, 8), feature_dim=8)).save_pretrained(str(judge_dir))
    report_path = tmp_path / "report.json"
    assert main(["eval", str(output / "final"), "--num", "2", "--max-new-tokens", "3", "--steps", "2",
                 "--judge", str(judge_dir), "--json", str(report_path), "--card", "org/tiny-face"]) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    card = (output / "final" / "README.md").read_text()
    # the card carries the measured numbers (model-index and table), the recipe that trained it, usage for the repo
    vqa = f"{round(report['understanding']['vqa_overall'], 4)}"
    assert "metrics:" in card and "VQA exact match" in card and vqa in card
    assert "judged attribute accuracy" in card and "Fréchet distance (judge features)" in card
    assert "## Training" in card and "`tiny` preset" in card and f"model for {TINY_RUN['model_steps']} steps" in card
    assert f"semantic (CLIP) encoder on the training faces' attributes for {TINY_RUN['semantic_steps']} steps" in card
    assert "one micro-batch of each task per step" in card  # the recipe's default mix_tasks
    repo_id = "org/tiny-face"  # a name for the card's usage snippets; nothing is downloaded
    assert f'from_pretrained("{repo_id}")' in card

    understanding = report["understanding"]
    asked = {name for index in range(2) for name, value in make_example("test", index, size=32)["attributes"].items()
             if value is not None}
    assert asked <= set(understanding["vqa_accuracy"])  # one entry per visible attribute (plus the expression)
    scores = [*understanding["vqa_accuracy"].values(), understanding["vqa_overall"], understanding["caption_recall"],
              *report["generation"]["judged_accuracy"].values()]
    assert all(0.0 <= score <= 1.0 for score in scores)
    generation = report["generation"]
    # 95% bootstrap intervals over the faces hold the point estimates, and the table prints them
    for (low, high), value in ((understanding["vqa_overall_ci95"], understanding["vqa_overall"]),
                               (generation["judged_accuracy_ci95"], generation["judged_accuracy"]["overall"])):
        assert 0.0 <= low <= value <= high <= 1.0 and f"{value:.3f} [{low:.3f}, {high:.3f}]" in table
    assert math.isfinite(generation["frechet_distance"]) and generation["frechet_distance"] >= 0
    assert math.isfinite(generation["frechet_floor"]) and generation["frechet_floor"] >= 0
    assert 0.0 <= generation["tokenizer_ceiling"] <= 1.0 and "the ceiling of generation" in table
    per_attribute = generation["tokenizer_ceiling_per_attribute"]
    assert per_attribute["overall"] == generation["tokenizer_ceiling"]
    assert set(per_attribute) == set(generation["judged_accuracy"])  # the same faces' categories, judged alike
    assert all(0.0 <= value <= 1.0 for value in per_attribute.values()) and "tokenizer reconstructions |" in table
    assert "real-vs-real floor at this size" in table
    assert "| hair_colour |" in table or "| hat |" in table
    # the majority-answer baseline: one entry per attribute asked, each the share of questions whose answer is the prior's
    prior = answer_prior()
    assert set(understanding["vqa_prior"]) == set(understanding["vqa_accuracy"])
    truths = {}
    for index in range(2):
        for name, _, answer in attribute_questions(make_example("test", index, size=32)["attributes"]):
            truths.setdefault(name, []).append(normalise_answer(answer) == prior[name])
    assert understanding["vqa_prior"] == pytest.approx({name: sum(hits) / len(hits) for name, hits in truths.items()})
    assert "majority-answer baseline" in table
    assert "Caption attribute recall" in table and "Fréchet distance" in table


def test_eval_without_judge_skips_generation_with_a_message(tiny_run, capsys):
    output, _ = tiny_run
    assert main(["eval", str(output / "final"), "--num", "1", "--max-new-tokens", "2"]) == 0
    assert "Generation metrics skipped: no --judge folder given" in capsys.readouterr().out


@pytest.mark.parametrize("command, options", [("train", ("--resume", "--model-steps", "--t2i-fraction", "--semantic-steps", "--no-mix-tasks")),
                                              ("eval", ("--judge", "--num", "--json"))])
def test_cli_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)


def test_mixed_records_follow_the_ratios():
    examples = [make_example("train", index, size=32) for index in range(10)]
    records = mixed_records(examples, t2i_fraction=0.8, describe_fraction=0.5)
    t2i = [record for record in records if "caption" in record]
    mmu = [record for record in records if "messages" in record]
    assert (len(t2i), len(mmu)) == (8, 2)
    questions = [record["messages"][0]["content"][1]["text"] for record in mmu]
    assert questions.count(DESCRIBE_QUESTION) == 1
    answers = [record["messages"][1]["content"][0]["text"] for record in mmu]
    mmu_examples = [example for example, record in zip(examples, records) if "messages" in record]
    assert {example["caption"] for example in mmu_examples} & set(answers)  # the describe answer is the caption


def test_mixed_records_ask_several_questions_per_conversation():
    examples = [make_example("train", index, size=32) for index in range(10)]
    records = mixed_records(examples, t2i_fraction=0.0, describe_fraction=0.0, questions_per_record=3, seed=0)
    for example, record in zip(examples, records):
        turns = record["messages"]
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * 3
        assert turns[0]["content"][0]["type"] == "image"  # the image once, in the first turn
        assert all(item["type"] == "text" for turn in turns[1:] for item in turn["content"])
        questions = [turn["content"][-1]["text"] for turn in turns[::2]]
        assert questions[0] == example["qa"][0] and len(set(questions)) == 3
        # every answer is the face's truth for its question (a yes/no value check or the attribute's value)
        truths = dict(vqa_pairs(example["attributes"], np.random.default_rng(0)))
        for question, answer in zip(questions, (turn["content"][0]["text"] for turn in turns[1::2])):
            if question in truths and not truths[question] in ("yes", "no"):
                assert answer == truths[question], (question, answer)
    assert records == mixed_records(examples, 0.0, 0.0, questions_per_record=3, seed=0)  # seeded


def test_normalise_answer_and_caption_mentions():
    assert normalise_answer("  Top   Hat. ") == "top hat"
    assert normalise_answer("Yes!") == "yes"
    attributes = {"hair_colour": "red", "glasses": "none", "smiling": "yes", "bald": "no", "eye_colour": None}
    assert caption_mentions(attributes, "A laughing person with red hair.") == (2, 2)
    assert caption_mentions(attributes, "A person with redish hair.") == (0, 2)
    # the dataset's own captions name every visible, present attribute
    for index in range(30):
        example = make_example("train", index, size=32)
        hits, counted = caption_mentions(example["attributes"], example["caption"])
        assert hits == counted > 0


def test_train_cli_vq_stage_saves_a_loadable_tokenizer(tmp_path, capsys):
    from transformers_f2ace import UniF2aceVQModel

    assert main(["train", str(tmp_path), "--stage", "vq", "--config", "tiny", "--num-train", "8", "--vq-steps", "2",
                 "--vq-batch-size", "4", "--no-progress", "--no-vq-bf16"]) == 0
    out = capsys.readouterr().out
    assert "stage vq:" in out and "s/step measured" in out and "Image tokenizer:" in out  # no "(bf16 autocast)"
    assert json.loads((tmp_path / "recipe_args.json").read_text())["vq_bf16"] is False
    assert not (tmp_path / "final").exists()  # the model stage did not run
    assert UniF2aceVQModel.from_pretrained(tmp_path / "vq").config.resolution == 32


def test_train_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="t2i_fraction must be in"):
        main(["train", "unused", "--t2i-fraction", "1.5"])
    with pytest.raises(SystemExit, match="batch_size must be even"):
        main(["train", "unused", "--batch-size", "15"])
    with pytest.raises(SystemExit, match=r"adam_beta2 must be in \[0, 1\)"):
        main(["train", "unused", "--adam-beta2", "1"])
    RecipeArguments(output_dir="unused", batch_size=15, mix_tasks=False)  # one batch per step: any size


def test_tokenizer_autocast_defaults_to_the_cpus_bf16_kernels_and_is_recorded(tiny_run):
    output, _ = tiny_run
    assert json.loads((output / "recipe_args.json").read_text())["vq_bf16"] is cpu_bf16_supported()
    assert RecipeArguments(output_dir="unused", vq_bf16=False).vq_bf16 is False
    assert RecipeArguments(output_dir="unused", vq_bf16=True).vq_bf16 is True


def test_model_stage_optimizer_follows_the_recipe(tmp_path):
    args = RecipeArguments(output_dir=str(tmp_path), lr=2e-3, adam_beta2=0.95, weight_decay=0.1, batch_size=16)
    training = model_training_arguments(args, tmp_path / "checkpoints")
    assert (training.learning_rate, training.adam_beta2, training.weight_decay) == (2e-3, 0.95, 0.1)
    assert training.per_device_train_batch_size == 8 and training.gradient_accumulation_steps == 2  # one per task
    single = model_training_arguments(RecipeArguments(output_dir=str(tmp_path), mix_tasks=False), tmp_path)
    assert single.per_device_train_batch_size == 16 and single.gradient_accumulation_steps == 1
    assert single.adam_beta2 == 0.999  # AdamW's usual default unless asked


def test_ablation_switches_change_the_trained_model(tiny_run, tmp_path):
    """A mask-only, dense run reuses the first run's tokenizer (`vq_dir`) and trains the model it describes."""
    output, _ = tiny_run
    ablation = tmp_path / "dense_mask_only"
    result = run_recipe(RecipeArguments(output_dir=str(ablation), vq_dir=str(output / "vq"), d3diff_alpha=0.0,
                                        moe=False, **{**TINY_RUN, "stage": "model"}))
    assert result.global_step == 4 and not (ablation / "vq").exists()
    assert result.semantic_probe is None and not (ablation / "final" / SEMANTIC_PROBE_FILE).exists()  # no encoder
    model = AutoModelForImageTextToText.from_pretrained(ablation / "final")
    assert model.config.d3diff_alpha == 0.0
    assert not model.config.moe_config.token_moe and not model.config.moe_config.sequence_moe
    assert not any("experts" in name for name, _ in model.named_parameters())
    vq_weights = load_file(output / "vq" / "model.safetensors")
    for name, tensor in model.model.vq.state_dict().items():
        torch.testing.assert_close(tensor, vq_weights[name], rtol=0, atol=0)
    # the score term is logged but weighs 0, and a dense model has no balance loss; with `mix_tasks` (the default)
    # each step accumulates one micro-batch per task (8 captions, 8 conversations, micro-batches of 2), so every step
    # logs both terms and its loss is the mean of the two micro-batches' losses: (text + mask) / 2
    entries = [entry for entry in result.log_history if "mask_loss" in entry]
    assert len(entries) == 4 and all("aux_loss" not in entry and entry["score_loss"] > 0 for entry in entries)
    for entry in entries:
        assert entry["loss"] == pytest.approx((entry["text_loss"] + entry["mask_loss"]) / 2, rel=1e-3)


def test_vq_dir_goes_only_with_stage_model(tmp_path):
    with pytest.raises(ValueError, match="only goes with stage 'model'"):
        RecipeArguments(output_dir=str(tmp_path), vq_dir=str(tmp_path / "vq"))
    with pytest.raises(SystemExit, match="d3diff_alpha must be >= 0"):
        main(["train", "unused", "--d3diff-alpha", "-1"])
