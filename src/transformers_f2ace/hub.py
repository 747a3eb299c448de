"""The Hub side: model cards rendered from `hub_cards/`, and pushes that upload a whole checkpoint in ONE commit.

- `render_model_card` / `render_adapter_card`: a `huggingface_hub.ModelCard` with the Hub metadata (library, pipeline
  tag, tags, base model, datasets, license, `model-index` evaluation results), usage snippets for this very
  checkpoint (with the package, and with `trust_remote_code=True`) and a summary of its configuration.
- `push_to_hub` / `push_adapter_to_hub`: save the model (sharded safetensors), processor, tokenizer and OUR card into
  a local staging folder, then `upload_checkpoint` it. A failed upload raises `HubUploadError` and keeps the folder;
  `upload_checkpoint(folder, repo_id)` (or `unif2ace push FOLDER REPO_ID`) finishes it later.
- `upload_checkpoint`: one commit with every file of a folder (a card is rendered when it has no README.md); weight
  files that the repo has at that revision but the folder lacks (stale shards) are deleted in the same commit.

Tokens come from the usual places (the `token` argument, `HF_TOKEN`, the token file under `HF_HOME`) and are never
printed.
"""

import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import get_token, validate_repo_id

from .configuration_unif2ace import UniF2aceConfig
from .modeling_unif2ace import UniF2aceForConditionalGeneration
from .processing_unif2ace import UniF2aceProcessor


HUB_CARDS_DIR = Path(__file__).resolve().parent / "hub_cards"  # also linked at the repository root
MODEL_CARD_TEMPLATE = HUB_CARDS_DIR / "model_card.md"
ADAPTER_CARD_TEMPLATE = HUB_CARDS_DIR / "adapter_card.md"
TAGS = ("unif2ace", "face", "multimodal", "text-to-image", "moe")
ADAPTER_TAGS = ("unif2ace", "face", "multimodal", "peft")
PIPELINE_TAG = "image-text-to-text"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
DEFAULT_COMMIT_MESSAGE = "Upload UniF²ace checkpoint"
URL_IN_MESSAGE = re.compile(r" for url \S+")  # upload URLs can carry signatures: keep them out of error messages


class HubUploadError(RuntimeError):
    """An upload failed after the checkpoint was staged; `folder` still holds every file, ready for a rerun."""

    def __init__(self, folder: Path, repo_id: str, error: Exception):
        self.folder = Path(folder)
        reasons, cause = [], error
        while cause is not None:  # huggingface_hub wraps transfer errors: show the chain, one line each, no URLs
            line = URL_IN_MESSAGE.sub("", (str(cause).strip().splitlines() or [""])[0])
            reason = f"{type(cause).__name__}: {line}"
            if reason not in reasons:
                reasons.append(reason)
            cause = cause.__cause__
        super().__init__(
            f"Uploading {self.folder} to {repo_id} failed ({' <- '.join(reasons)}). The checkpoint is still in "
            f"{self.folder}; finish with `unif2ace push {self.folder} {repo_id}` or "
            f"`transformers_f2ace.hub.upload_checkpoint({str(self.folder)!r}, {repo_id!r})` (a rerun uploads only "
            "what the Hub lacks)."
        )


# ------------------------------------------------------------------------------------------------------------- cards
def _count(n: int) -> str:
    """1234567 -> '1.23M (1,234,567)'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value else None)


def model_summary(model, processor: UniF2aceProcessor | None = None) -> dict:
    """What the card says about a UniF²ace model: parameter counts (from `model.parameter_counts()`), layers, experts,
    image resolution / tokens, vocabulary, sampling defaults and, with a processor, its tokenizer."""
    config: UniF2aceConfig = model.config
    text, moe, vq = config.text_config, config.moe_config, config.vq_config
    counts = model.parameter_counts()
    token_moe = "off (dense MLP)"
    if moe.token_moe:
        shared = (f" + 1 shared expert (width {moe.shared_expert_intermediate_size})"
                  if moe.shared_expert_intermediate_size else "")
        token_moe = (f"per task group (understanding, generation): {moe.num_experts} routed experts (width "
                     f"{moe.expert_intermediate_size}), top-{moe.num_experts_per_tok} per token{shared}")
    sequence_moe = "off"
    if moe.sequence_moe:
        sequence_moe = (f"top-{moe.num_sequence_experts_per_seq} of {moe.num_sequence_experts} per sequence; "
                        f"understanding: {', '.join(moe.mmu_sequence_experts)}; "
                        f"generation: {', '.join(moe.t2i_sequence_experts)}")
        if moe.mmu_fixed_sequence_route is not None:
            sequence_moe += f"; understanding always routed to {' + '.join(moe.mmu_fixed_sequence_route)}"
        if moe.feature_gate_bias > 0:
            sequence_moe += f"; feature gates opened (bias {moe.feature_gate_bias:g})"
        sequence_moe += f"; {moe.resampler_type} resampler"
    summary = {
        "params": {"total": _count(counts["total"]), "trainable": _count(counts["total_without_frozen"]),
                   **{key: _count(counts[key]) for key in ("decoder", "sequence_moe", "resamplers", "frozen_encoders",
                                                           "vq")}},
        "has_encoders": counts["frozen_encoders"] > 0,
        "layers": text.num_hidden_layers, "block_style": text.block_style, "hidden_size": text.hidden_size,
        "heads": text.num_attention_heads, "max_positions": text.max_position_embeddings,
        "token_moe": token_moe, "sequence_moe": sequence_moe,
        "resolution": vq.resolution, "num_image_tokens": config.num_image_tokens, "grid": vq.latent_size,
        "patch": vq.downsample_factor, "codebook_size": config.codebook_size, "vocab_size": config.vocab_size,
        "text_vocab_size": config.text_vocab_size, "num_special": len(config.special_tokens),
        "steps": config.image_generation_steps, "guidance_scale": config.image_guidance_scale,
        "mask_schedule": config.mask_schedule, "dtype": str(model.dtype).removeprefix("torch."),
    }
    if processor is not None:
        tokenizer = processor.tokenizer
        summary.update(tokenizer_size=len(tokenizer), max_length=tokenizer.model_max_length,
                       chat_template="USER / ASSISTANT (Show-o)" if processor.chat_template else "none")
    return summary


def _card_data(repo_id: str, library_name: str, tags: Sequence[str], base_model: str | None,
               datasets: str | Sequence[str] | None, eval_results: Sequence[EvalResult] | None, license: str,
               model_name: str | None) -> ModelCardData:
    for name, value in (("base_model", base_model), *(("datasets", d) for d in _as_list(datasets) or [])):
        if value is not None:
            _check_repo_id(value, name)
    return ModelCardData(
        library_name=library_name, pipeline_tag=PIPELINE_TAG, tags=list(tags), license=license,
        base_model=base_model, datasets=_as_list(datasets), eval_results=list(eval_results) if eval_results else None,
        model_name=(model_name or repo_id.split("/")[-1]) if eval_results else model_name,
    )


def render_model_card(
    model,
    processor: UniF2aceProcessor | None = None,
    *,
    repo_id: str,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
    adapters: Mapping[str, str] | None = None,
    training: str | None = None,
) -> ModelCard:
    """The model card of a UniF²ace checkpoint published as `repo_id`, from `hub_cards/model_card.md`.

    Args:
        model: a `UniF2aceForConditionalGeneration` (on any device, meta included).
        processor: its processor, for the tokenizer line of the summary.
        repo_id: the Hub repo the usage snippets load from.
        base_model, datasets: Hub ids (model, datasets) for the metadata.
        eval_results: `huggingface_hub.EvalResult`s, written as the `model-index` and an evaluation table.
        license: a Hub license identifier.
        model_name: the `model-index` name (default: the repo name).
        adapters: `{subfolder: description}` of PEFT adapters stored in the same repo.
        training: markdown for a "Training" section (data, command, budget).
    """
    _check_repo_id(repo_id, "repo_id")
    data = _card_data(repo_id, "transformers", TAGS, base_model, datasets, eval_results, license, model_name)
    return ModelCard.from_template(
        data, template_path=str(MODEL_CARD_TEMPLATE), title=data.model_name or repo_id.split("/")[-1],
        repo_id=repo_id, s=model_summary(model, processor), adapters=dict(adapters or {}),
        results=list(eval_results or []), training=training,
    )


def _adapter_config(peft_model_or_config):
    """The active adapter's PeftConfig, and the PEFT model (None when a config was given)."""
    configs = getattr(peft_model_or_config, "peft_config", None)
    if configs is None:
        return peft_model_or_config, None
    return configs[peft_model_or_config.active_adapter], peft_model_or_config


def adapter_summary(peft_model_or_config) -> dict:
    """Method, rank, targets and (with a PeftModel) the trainable parameter count of an adapter."""
    config, peft_model = _adapter_config(peft_model_or_config)
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    targets = config.target_modules
    summary = {
        "peft_type": peft_type,
        "rank": getattr(config, "r", None), "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "target_modules": ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, (set, list, tuple))
        else f"`{targets}`" if targets else "none",
        "target_parameters": ", ".join(f"`{t}`" for t in getattr(config, "target_parameters", None) or []),
    }
    if peft_model is not None:
        trainable, total = peft_model.get_nb_trainable_parameters()
        summary.update(trainable=_count(trainable), total=_count(total), percent=f"{100 * trainable / total:.3f}%")
    return summary


def render_adapter_card(
    peft_model_or_config,
    base_repo_id: str,
    *,
    repo_id: str,
    datasets: str | Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
) -> ModelCard:
    """The card of a PEFT adapter (a `PeftModel` or its `PeftConfig`) for the UniF²ace model `base_repo_id`, published
    as `repo_id`, from `hub_cards/adapter_card.md`."""
    _check_repo_id(repo_id, "repo_id")
    summary = adapter_summary(peft_model_or_config)
    tags = [*ADAPTER_TAGS, summary["peft_type"].lower(), f"base_model:adapter:{base_repo_id}"]
    data = _card_data(repo_id, "peft", tags, base_repo_id, datasets, eval_results, license, model_name)
    return ModelCard.from_template(
        data, template_path=str(ADAPTER_CARD_TEMPLATE), title=data.model_name or repo_id.split("/")[-1],
        repo_id=repo_id, s=summary, results=list(eval_results or []),
    )


def render_folder_card(folder: str | Path, repo_id: str, *, base_model: str | None = None, **card_kwargs) -> ModelCard:
    """The card of a saved folder: an adapter card when it holds `adapter_config.json` (base model: `base_model`, else
    the one the adapter config names), else a model card built from its config (the model is instantiated on the meta
    device: nothing is loaded) listing the adapters in its subfolders."""
    from peft import PeftConfig

    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        config = PeftConfig.from_pretrained(folder)
        base = base_model or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{folder} holds an adapter that names no base model: pass base_model (--base-model)")
        return render_adapter_card(config, base, repo_id=repo_id, **card_kwargs)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is neither a saved checkpoint (config.json) nor an adapter "
                                "(adapter_config.json)")
    config = UniF2aceConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = UniF2aceForConditionalGeneration(config)
    processor = UniF2aceProcessor.from_pretrained(folder) if (folder / "processor_config.json").exists() else None
    adapters = {}
    for adapter_config in sorted(folder.glob("*/adapter_config.json")):
        summary = adapter_summary(PeftConfig.from_pretrained(adapter_config.parent))
        rank = f" rank {summary['rank']}" if summary["rank"] else ""
        adapters[adapter_config.parent.name] = f"{summary['peft_type']}{rank} on {summary['target_modules']}"
    return render_model_card(model, processor, repo_id=repo_id, base_model=base_model, adapters=adapters,
                             **card_kwargs)


# ------------------------------------------------------------------------------------------------------------ pushes
def _check_repo_id(repo_id: str, name: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{name} {repo_id!r} is not a valid Hub repo id ('name' or 'namespace/name'): {error}"
        ) from None


def _authenticated_api(token: str | None) -> HfApi:
    """An HfApi whose token (argument, HF_TOKEN or the HF_HOME token file) the Hub accepts for writing."""
    if token is None and get_token() is None:
        raise PermissionError("Pushing to the Hub needs a token with write access, and none was found: pass token=..., "
                              "set HF_TOKEN, or log in with `hf auth login`.")
    api = HfApi(token=token)
    try:
        account = api.whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no response"
        raise PermissionError(
            f"The Hub rejected the token (HTTP {status}): it is invalid, expired or revoked. Create a new one with "
            "write access and pass it as token=... or HF_TOKEN."
        ) from None
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PermissionError("The token is read-only: pushing needs a token with write access.")
    return api


def _folder_files(folder: Path) -> list[str]:
    """Paths (posix, relative) of the files to upload: everything but `.git/` and huggingface_hub's `.cache/`."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not relative.startswith((".git/", ".cache/")):
            files.append(relative)
    return files


def upload_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    base_model: str | None = None,
) -> CommitInfo:
    """Upload every file of `folder` to `repo_id` in ONE commit and return its `CommitInfo`.

    The repo is created when missing (`private` applies only then); `revision` is a branch, created from `main` when
    missing. Without a README.md in the folder, `render_folder_card` writes one (with `base_model`). Weight files the
    repo has at `revision` that the folder lacks are deleted in the same commit, so no stale shard outlives a push.
    Raises `PermissionError` for a missing / rejected / read-only token, `HubUploadError` when the upload fails.
    """
    folder = Path(folder)
    _check_repo_id(repo_id, "repo_id")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist")
    api = _authenticated_api(token)
    if not (folder / "README.md").exists():
        render_folder_card(folder, repo_id, base_model=base_model).save(folder / "README.md")
    return _upload_folder(api, folder, repo_id, revision, private, commit_message, commit_description)


def _upload_folder(api: HfApi, folder: Path, repo_id: str, revision: str | None, private: bool, commit_message: str,
                   commit_description: str | None) -> CommitInfo:
    local = _folder_files(folder)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [p for p in remote if p.endswith(WEIGHT_SUFFIXES) and p not in local]
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision)
    except Exception as error:
        raise HubUploadError(folder, repo_id, error) from error


def _staged_upload(save, repo_id: str, staging_dir: str | Path | None, token: str | None, revision: str | None,
                   private: bool, commit_message: str, commit_description: str | None) -> CommitInfo:
    """`save(folder)` into the staging folder, then upload it in one commit; a temporary staging folder is removed
    after a successful upload and kept after a failed one."""
    _check_repo_id(repo_id, "repo_id")
    api = _authenticated_api(token)  # fail on the token before spending time on saving
    folder = Path(staging_dir) if staging_dir is not None else Path(tempfile.mkdtemp(prefix="unif2ace-push-"))
    folder.mkdir(parents=True, exist_ok=True)
    save(folder)
    info = _upload_folder(api, folder, repo_id, revision, private, commit_message, commit_description)
    if staging_dir is None:
        shutil.rmtree(folder)
    return info


def push_to_hub(
    model,
    processor: UniF2aceProcessor | None,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    max_shard_size: int | str = "5GB",
    staging_dir: str | Path | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Publish a UniF²ace model (+ processor and tokenizer) with its model card as ONE commit to `repo_id`.

    The model (safetensors, shards of at most `max_shard_size`), the processor and the card rendered by
    `render_model_card(model, processor, repo_id=repo_id, **card_kwargs)` are saved into `staging_dir` (default: a
    temporary folder), which `upload_checkpoint` uploads. If the upload fails, `HubUploadError` names the folder,
    which is kept: `upload_checkpoint(folder, repo_id)` completes it.
    """
    def save(folder: Path) -> None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(folder)
        render_model_card(model, processor, repo_id=repo_id, **card_kwargs).save(folder / "README.md")

    return _staged_upload(save, repo_id, staging_dir, token, revision, private, commit_message, commit_description)


def push_adapter_to_hub(
    peft_model,
    repo_id: str,
    *,
    base_repo_id: str,
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload UniF²ace adapter",
    commit_description: str | None = None,
    staging_dir: str | Path | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Publish a PEFT adapter of the UniF²ace model `base_repo_id` (adapter weights + config + our adapter card) as ONE
    commit to `repo_id`; staging and failures as in `push_to_hub`."""
    def save(folder: Path) -> None:
        peft_model.save_pretrained(folder)
        render_adapter_card(peft_model, base_repo_id, repo_id=repo_id, **card_kwargs).save(folder / "README.md")

    return _staged_upload(save, repo_id, staging_dir, token, revision, private, commit_message, commit_description)


__all__ = [
    "HubUploadError",
    "model_summary",
    "adapter_summary",
    "render_model_card",
    "render_adapter_card",
    "render_folder_card",
    "upload_checkpoint",
    "push_to_hub",
    "push_adapter_to_hub",
]
