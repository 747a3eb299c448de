"""More than one process: the example scripts under `torchrun` / `accelerate launch` with 2 CPU processes (gloo DDP).

Equivalence that is checked: 2 processes × per-device batch B == 1 process × batch B × 2 gradient-accumulation steps.
Every loss term is a mean over its own micro-batch (text CE over the micro-batch's answer tokens, D3Diff over its
masked positions, the balance loss over its tokens); DDP averages the ranks' gradients and the Trainer divides each
accumulated micro-batch loss by the accumulation steps, so both optimise the mean of the two micro-batch means, over
the same micro-batches (accelerate gives rank r batch r, r + 2, ... of the shared sampler order; the single process
takes them in that order) with the same masks (`StepSeededCollator` seeds micro-batch i the same way in both). One
process with batch 2B is a different objective (token-weighted means over the union), so it is not the reference.
The T2I noise expert draws from the global RNG, which every rank seeds alike: the test model sets `noise_std=0`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


for extra in ("peft", "trl", "datasets"):  # the `train` extra
    pytest.importorskip(extra)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(EXAMPLES))

import train_unified  # noqa: E402

from transformers_f2ace import UniF2aceConfig  # noqa: E402

# Tolerance: none. Same micro-batches, masks and kernels (one thread each), and with 2 processes the averaged gradient
# is bit-identical too: DDP's (g0 / 2) + (g1 / 2) and accumulation's g0 / 2 + g1 / 2 (backward of loss / 2) only
# scale by a power of two, which commutes with float rounding, and a sum of two terms does not depend on its order.
# (With a world size that is not a power of two, or more than two terms, the last bits may differ.)
TERMS = ("loss", "text_loss", "mask_loss", "score_loss", "aux_loss", "grad_norm")


def launch(launcher: list[str], script: str, args: list[str], timeout: int = 240) -> None:
    python_path = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", *launcher, str(EXAMPLES / script), *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def logged_steps(output_dir: Path) -> list[dict]:
    """The per-step training logs of a run (`trainer_state.json` of its last checkpoint)."""
    checkpoint = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("distributed") / "base"
    train_unified.build_toy_checkpoint(folder, UniF2aceConfig.tiny(moe_config=dict(noise_std=0.0)))
    return folder


def test_two_processes_match_one_process_with_accumulation(tmp_path, base):
    common = ["--model", str(base), "--max_steps", "3", "--per_device_train_batch_size", "2", "--num_examples", "16",
              "--save_strategy", "steps", "--save_steps", "3", "--seed", "3"]
    launch(["torch.distributed.run", "--nproc_per_node", "2"], "train_unified.py",
           [*common, "--output_dir", str(tmp_path / "ddp")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_unified.main([*common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(threads)

    ddp, single = logged_steps(tmp_path / "ddp"), logged_steps(tmp_path / "single")
    assert [e["step"] for e in ddp] == [e["step"] for e in single] == [1, 2, 3]
    # two processes really shared the work: each optimizer step consumed 2 x 2 of the 16 examples
    assert ddp[0]["epoch"] == single[0]["epoch"] == pytest.approx(4 / 16)
    for step_ddp, step_single in zip(ddp, single):
        assert {term: step_ddp[term] for term in TERMS} == {term: step_single[term] for term in TERMS}
    assert len({e["loss"] for e in ddp}) == 3  # the weights moved: the three steps saw different losses


def test_accelerate_launch_ddp_config_runs_sft_with_lora(tmp_path, base):
    config = EXAMPLES / "accelerate_configs" / "ddp.yaml"
    output = tmp_path / "sft"
    launch(["accelerate.commands.launch", "--config_file", str(config)], "sft_understanding.py",
           ["--model", str(base), "--lora", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--num_examples", "8", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(output)])
    logs = logged_steps(output)
    assert [e["step"] for e in logs] == [1, 2]
    assert logs[0]["epoch"] == pytest.approx(4 / 8)  # 2 processes x batch 2 of 8 examples
    assert all({"text_loss", "aux_loss", "mean_token_accuracy"} <= e.keys() for e in logs)
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP2 through accelerate needs GPUs: accelerate only turns FSDP on for GPU-like distributed types, so on "
           "CPU its state falls back to gloo DDP (MULTI_CPU) and ignores the FSDP config (torch's own fully_shard does "
           "run on gloo; the Trainer path does not reach it)",
)
def test_fsdp2_config_on_gpus(tmp_path, base):
    config = EXAMPLES / "accelerate_configs" / "fsdp2.yaml"
    launch(["accelerate.commands.launch", "--config_file", str(config)], "train_unified.py",
           ["--model", str(base), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
            "--save_steps", "2", "--output_dir", str(tmp_path / "fsdp")])
    logs = logged_steps(tmp_path / "fsdp")
    assert len(logs) == 2 and all(e["loss"] == e["loss"] for e in logs)


def test_sharding_configs_fit_the_model():
    """The FSDP2 config wraps the model's own no-split block; the DeepSpeed configs leave every size the Trainer knows
    to the Trainer ("auto") and select ZeRO stage 2 / 3."""
    from accelerate.commands.config.config_args import load_config_from_file

    from transformers_f2ace import UniF2aceForConditionalGeneration

    fsdp = load_config_from_file(str(EXAMPLES / "accelerate_configs" / "fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    wrapped = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert [wrapped] == UniF2aceForConditionalGeneration._no_split_modules
    for stage in (2, 3):
        config = json.loads((EXAMPLES / "accelerate_configs" / f"deepspeed_zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert config[key] == "auto", key
