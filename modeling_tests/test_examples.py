"""The example scripts (examples/*.py) on tiny models, in process through their `main(argv)`: arguments, logged loss
terms, loadable results, TRL's fused LM head vs the model's own loss, gradient checkpointing, bf16 autocast, and
bit-identical resumption from a checkpoint. Real Trainer / TRL / PEFT; the multi-process runs are in
test_distributed.py."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_f2ace import UniF2aceConfig


for extra in ("peft", "trl", "datasets"):  # the `train` extra
    pytest.importorskip(extra)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune_generation  # noqa: E402
import sft_understanding  # noqa: E402
import train_unified  # noqa: E402

# merged vs adapter outputs: float32 rounding of W + B·A (measured ~3e-7), see test_peft.py
MERGE_ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and the CPU is shared: run single-threaded (as the subprocess runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("examples") / "base"
    train_unified.build_toy_checkpoint(folder, UniF2aceConfig.tiny())
    return folder


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def t2i_batch(folder: Path) -> dict:
    return AutoProcessor.from_pretrained(folder)(text=["a face with red hair on a blue background", "a face"],
                                                 return_tensors="pt")


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


# ------------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("script", [train_unified, finetune_generation, sft_understanding])
def test_help_lists_the_common_arguments(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--tiny", "--max_steps", "--output_dir", "--lora", "--lora_parts", "--merge_lora",
                   "--resume_from_checkpoint", "--bf16", "--gradient_checkpointing", "--activation_checkpointing"):
        assert option in text, option


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="t2i_fraction"):
        train_unified.main(["--tiny", "--t2i_fraction", "1.5", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not a folder with a config.json"):
        train_unified.main(["--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------------------- scripts
def test_train_unified_logs_every_term_and_saves_a_loadable_model(tmp_path):
    """The default path: `--tiny` builds the base checkpoint under output_dir/base."""
    trainer = train_unified.main(["--tiny", "--max_steps", "2", "--output_dir", str(tmp_path)])
    config = trainer.model.config
    logs = step_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:  # the total is the model's SPEC §4 sum of the logged terms
        total = (entry["text_loss"] + entry["mask_loss"] + config.d3diff_alpha * entry["score_loss"]
                 + config.router_aux_loss_coef * entry["aux_loss"])
        assert entry["loss"] == pytest.approx(total, rel=1e-5)
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).num_image_tokens == config.num_image_tokens
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)
    frozen = zip(trained.model.vq.state_dict().values(), base.model.vq.state_dict().values())
    assert all(torch.equal(a, b) for a, b in frozen)  # the VQ tokenizer stays frozen


def test_finetune_generation_with_lora_merges_and_samples(tmp_path, base):
    trainer = finetune_generation.main([
        "--model", str(base), "--lora", "--merge_lora", "--max_steps", "2", "--num_samples", "2",
        "--num_inference_steps", "2", "--output_dir", str(tmp_path),
    ])
    logs = step_logs(trainer)
    assert len(logs) == 2 and all({"mask_loss", "score_loss", "aux_loss"} <= e.keys() for e in logs)
    assert not any("text_loss" in e for e in logs)  # caption records only
    cell = 128 + 4
    assert Image.open(tmp_path / "samples.png").size == (2 * cell + 4, cell + 4)

    batch = t2i_batch(base)
    adapter = AutoModelForImageTextToText.from_pretrained(tmp_path)  # PEFT integration, base from adapter_config
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, batch), logits(adapter, batch), atol=MERGE_ATOL, rtol=0)
    assert (logits(merged, batch) - logits(AutoModelForImageTextToText.from_pretrained(base), batch)).abs().max() > 0


def test_sft_understanding_with_lora(tmp_path, base):
    """With accumulation, TRL normalises the text loss by the whole step's tokens: the logged terms still add up."""
    trainer = sft_understanding.main([
        "--model", str(base), "--lora", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path),
    ])
    coef = trainer.model.config.router_aux_loss_coef
    logs = step_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["text_loss"] + coef * entry["aux_loss"], rel=1e-5)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["modules_to_save"] == ["lm_head"]
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)).__name__ == "UniF2aceForConditionalGeneration"


def test_processor_assistant_masks_follow_the_image_expansion(base):
    """`apply_chat_template(..., return_assistant_tokens_mask=True)` through the processor: the masks cover exactly the
    answers (+ EOS), in a left-padded batch, also for an answer that comes before the image (in a later turn)."""
    processor = AutoProcessor.from_pretrained(base)
    face = Image.new("RGB", (32, 32), (200, 0, 0))
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": face}, {"type": "text", "text": "hair?"}]},
         {"role": "assistant", "content": "red"}],
        [{"role": "system", "content": "describe the face."},
         {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
         {"role": "user", "content": [{"type": "image", "image": face}, {"type": "text", "text": "glasses?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
    ]
    out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True)
    ids, masks = out["input_ids"], out["assistant_masks"].bool()
    assert bool((out["attention_mask"][0] == 0).any())  # the short row is left-padded
    decode = processor.tokenizer.decode
    assert decode(ids[0][masks[0]]) == " red<|endoftext|>"
    assert decode(ids[1][masks[1]]) == " hi there<|endoftext|> no<|endoftext|>"
    # the offsets the masks are placed with: each insertion's span in the given text and in the processed sequence
    rendered = processor.apply_chat_template(conversations[1], tokenize=False)
    replacements = processor(images=[face], text=rendered, return_text_replacement_offsets=True)[
        "text_replacement_offsets"][0]
    assert [r["type"] for r in replacements] == ["task", "image"]
    sequence = processor.tokenizer.decode(processor(images=[face], text=rendered)["input_ids"][0])
    for record in replacements:
        start, end = record["new_span"]
        assert sequence[start:end] == record["replacement"] and rendered[slice(*record["span"])] == record["text"]


@pytest.mark.parametrize("assistant_only", [True, False])
def test_sft_labels_and_trl_fused_loss_match_the_model(tmp_path, base, assistant_only):
    """TRL's fused LM head shifts the labels itself and calls the backbone without them: its loss (plus the recorded
    balance loss) equals the model's own forward with labels, and a naive shifted cross-entropy."""
    script_args, training_args = sft_understanding.parse_args(
        ["--model", str(base), "--output_dir", str(tmp_path), "--assistant_only_loss", str(assistant_only)],
        "", sft_understanding.ModelArguments, training_class=sft_understanding.SFTConfig,
        **sft_understanding.SFT_DEFAULTS,
    )
    dataset = sft_understanding.chat_dataset(4, seed=0)
    trainer, processor = sft_understanding.build_trainer(script_args, training_args, dataset)
    batch = trainer.data_collator([dict(row) for row in dataset])
    ids, labels = batch["input_ids"], batch["labels"]
    config = trainer.model.config
    answers = [row["messages"][1]["content"][0]["text"] for row in dataset]

    for row, answer in zip(range(len(dataset)), answers):
        kept = labels[row] != -100
        assert torch.equal(labels[row][kept], ids[row][kept])
        soi, eoi = ids[row].tolist().index(config.soi_token_id), ids[row].tolist().index(config.eoi_token_id)
        assert not bool(kept[soi:eoi + 1].any())  # the image span is never a target
        text = processor.tokenizer.decode(labels[row][kept])
        if assistant_only:
            assert text == f" {answer}<|endoftext|>"
        else:
            assert text.endswith(f"ASSISTANT: {answer}<|endoftext|>\n") and text.startswith("<|mmu|><|endoftext|>USER:")

    model = trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        own = model(**batch, output_router_logits=True)
        logits_ = own.logits.float()
        naive = F.cross_entropy(logits_[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert own.text_loss.item() == pytest.approx(naive.item(), rel=1e-5)
    assert trl_loss.item() == pytest.approx(own.loss.item(), rel=1e-5)
    assert trl_loss.item() == pytest.approx(naive.item() + config.router_aux_loss_coef * own.aux_loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------------- checkpointing, bf16, resume
def test_gradient_checkpointing_and_bf16_steps(tmp_path, base):
    common = ["--model", str(base), "--max_steps", "2", "--per_device_train_batch_size", "2"]
    plain = step_logs(train_unified.main([*common, "--output_dir", str(tmp_path / "plain")]))
    checkpointed_trainer = train_unified.main([*common, "--gradient_checkpointing", "--output_dir",
                                               str(tmp_path / "checkpointed")])
    assert checkpointed_trainer.model.is_activation_checkpointing
    checkpointed = step_logs(checkpointed_trainer)
    # recomputing the activations changes nothing: same forward, same gradients
    assert checkpointed[0]["loss"] == plain[0]["loss"]
    assert checkpointed[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-6)

    bf16_trainer = train_unified.main([*common, "--bf16", "--output_dir", str(tmp_path / "bf16")])
    assert bf16_trainer.accelerator.mixed_precision == "bf16"
    bf16 = step_logs(bf16_trainer)
    assert all(math.isfinite(e["loss"]) for e in bf16)
    # autocast really ran in bfloat16 (~3 significant digits): close to the float32 loss, but not equal
    assert bf16[0]["loss"] != plain[0]["loss"]
    assert bf16[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05)


def resume_logs(tmp_path, base, *extra, control: bool = False) -> tuple[list[dict], list[dict]]:
    """4 steps saving every 2, and a second run resumed from checkpoint-2 (6 examples at batch 2: step 4 starts the
    second epoch). `control` swaps in the plain stateful-generator collator. Returns every log entry of both runs."""
    common = ["--model", str(base), "--max_steps", "4", "--per_device_train_batch_size", "2", "--num_examples", "6",
              "--save_strategy", "steps", "--save_steps", "2", *extra]

    def run(output_dir, resume=None):
        script_args, training_args = train_unified.parse_args([*common, "--output_dir", str(output_dir)], "",
                                                              train_unified.UnifiedArguments)
        records = train_unified.toy_face_records(script_args.num_examples, script_args.t2i_fraction, training_args.seed)
        held_out = train_unified.toy_face_records(script_args.num_eval_examples, script_args.t2i_fraction, 99)
        trainer, _ = train_unified.build_trainer(script_args, training_args, records, held_out or None)
        if control:
            plain = trainer.data_collator.collator
            plain.generator, plain.seed = None, training_args.seed
            trainer.data_collator = plain
        trainer.train(resume_from_checkpoint=resume)
        return trainer.state.log_history[:-1]  # the last entry is the run summary (runtime)

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= saved
    return full, run(tmp_path / "resumed", resume=str(checkpoint))


@pytest.mark.parametrize(
    "extra",
    [["--num_eval_examples", "2", "--eval_strategy", "steps", "--eval_steps", "1"], ["--lora", "--lora_r", "4"]],
    ids=["full-with-evaluations", "lora"],
)
def test_resume_continues_bit_identically(tmp_path, base, extra):
    """Every logged number of the resumed steps (training terms, learning rate, gradient norm, evaluation losses) is
    the uninterrupted run's, bit for bit: weights, optimizer, scheduler, RNG and the masks all carried over."""
    full, resumed = resume_logs(tmp_path, base, *extra)
    assert [e["step"] for e in full if "loss" in e] == [1, 2, 3, 4]
    assert len(full) == len(resumed) and any("eval_loss" in e for e in full) == ("--eval_strategy" in extra)
    for before, after in zip(full, resumed):
        assert {k: v for k, v in before.items() if "runtime" not in k and "per_second" not in k} == {
            k: v for k, v in after.items() if "runtime" not in k and "per_second" not in k}


def test_resume_with_a_stateful_mask_generator_diverges(tmp_path, base):
    """The control: a collator drawing from one running generator restarts it on resume (the Trainer skips the trained
    batches without collating them), so the resumed masks and losses differ."""
    full, resumed = resume_logs(tmp_path, base, control=True)
    assert full[:2] == resumed[:2] and full[2]["step"] == 3 and full[2]["loss"] != resumed[2]["loss"]
