"""The Hub side over real HTTP: model cards, pushes (one commit, resumable), pulls by every route users take.

A Hub-compatible server (`hub_server.py`) runs in this process on 127.0.0.1. The clients are the real ones
(huggingface_hub, transformers, peft, the `unif2ace` CLI) in subprocesses, because huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_DISABLE_XET when it is imported: most checks run in one long-lived client process
(`HubClient`), the rest (no package installed, offline mode, the CLI) in their own interpreters.
"""

import hashlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult
from PIL import Image

from conftest import BLOCK_PACKAGE, CORPUS
from hub_server import HubClient, HubServer, hub_env, validate_card_metadata
from transformers_f2ace import (
    UniF2aceConfig,
    UniF2aceForConditionalGeneration,
    UniF2aceImageProcessor,
    UniF2aceProcessor,
)
from transformers_f2ace.hub import render_adapter_card, render_model_card
from transformers_f2ace.tokenization_unif2ace import train_unif2ace_tokenizer


REPO = "org/unif2ace-tiny"
SHARD = "300KB"  # the tiny model (~1.9 MB) then spans several safetensors shards
PROMPT = "a smiling woman with red hair"
CARD_ARGS = dict(base_model="org/unif2ace-base", datasets=["org/synthface"],
                 eval_results=[EvalResult(task_type="visual-question-answering", dataset_type="org/synthface",
                                          dataset_name="SynthFace", metric_type="accuracy", metric_value=0.75)])

def weights_digest(model) -> str:
    """sha256 over every (key, bytes) of the state dict: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# the client processes get the same function, from its source
WEIGHTS_DIGEST = "import hashlib\n\nimport torch\n\n\n" + inspect.getsource(weights_digest)

CLIENT_PREAMBLE = WEIGHTS_DIGEST + textwrap.dedent(
    """
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    import transformers_f2ace  # noqa: F401
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers_f2ace import hub

    def load_local(folder):
        return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)

    def t2i_ids(processor):
        return processor(text=[args_prompt], mode="t2i", return_tensors="pt")["input_ids"].tolist()
    """
).replace("args_prompt", repr(PROMPT))

class Accounts:
    """The server's users: `tester` (member of `org`) with a write token, a read-only token and a revoked one, and
    `outsider` (not in `org`) with a write token."""

    def __init__(self, server: HubServer):
        self.write = server.add_token("tester", orgs=("org",))
        self.read_only = server.add_token("tester", orgs=("org",), role="read")
        self.revoked = server.add_token("tester", orgs=("org",))
        self.outsider = server.add_token("outsider")
        server.revoke(self.revoked)

    @property
    def secrets(self) -> list[str]:
        return [self.write, self.read_only, self.revoked, self.outsider]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def accounts(hub) -> Accounts:
    return Accounts(hub)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The client processes' working directory, with the face the card snippets open."""
    folder = tmp_path_factory.mktemp("work")
    Image.new("RGB", (40, 40), (200, 120, 90)).save(folder / "face.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny UniF²ace with its processor, saved locally (no card): (folder, model, processor)."""
    config = UniF2aceConfig.tiny()
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    tokenizer = train_unif2ace_tokenizer(CORPUS, config)
    processor = UniF2aceProcessor(UniF2aceImageProcessor.from_model_config(config), tokenizer,
                                  num_image_tokens=config.num_image_tokens)
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def client_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client_home")


@pytest.fixture(scope="module")
def client(hub, accounts, workdir, client_home, tmp_path_factory):
    """The long-lived client process: HF_TOKEN is tester's write token, HF_HOME `client_home`."""
    process = HubClient(hub_env(hub, client_home, accounts.write), workdir, tmp_path_factory.mktemp("client_logs"),
                        CLIENT_PREAMBLE)
    yield process
    process.close()


@pytest.fixture(scope="module")
def pushed(hub, client, checkpoint):
    """`hub.push_to_hub` of the checkpoint to REPO (sharded, with card metadata); returns the commit id."""
    folder = checkpoint[0]
    return client.run(
        """
        from huggingface_hub import EvalResult
        model, processor = load_local(args["folder"])
        eval_results = [EvalResult(**r) for r in args["eval_results"]]
        info = hub.push_to_hub(model, processor, args["repo"], max_shard_size=args["shard"],
                               base_model=args["base_model"], datasets=args["datasets"], eval_results=eval_results)
        result = info.oid
        """,
        folder=str(folder), repo=REPO, shard=SHARD, base_model=CARD_ARGS["base_model"],
        datasets=CARD_ARGS["datasets"], eval_results=[vars(r) for r in CARD_ARGS["eval_results"]],
    )


def saved_files(model, processor, folder: Path, **save_kwargs) -> set[str]:
    """What save_pretrained writes for this model + processor (computed here, independently of the push)."""
    model.save_pretrained(folder, **save_kwargs)
    processor.save_pretrained(folder)
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def card_sections(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, re.DOTALL)


# ------------------------------------------------------------------------------------------------------------- cards
def test_model_card_metadata_and_summary(checkpoint):
    _, model, processor = checkpoint
    card = render_model_card(model, processor, repo_id=REPO, license="mit", **CARD_ARGS)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert {"unif2ace", "face", "multimodal", "text-to-image", "moe"} <= set(data["tags"])
    assert data["base_model"] == "org/unif2ace-base" and data["datasets"] == ["org/synthface"]
    assert data["license"] == "mit"
    [entry] = data["model-index"]
    [result] = entry["results"]
    assert entry["name"] == "unif2ace-tiny"
    assert result["metrics"] == [{"type": "accuracy", "value": 0.75}]
    assert result["dataset"] == {"name": "SynthFace", "type": "org/synthface"}

    text = card.text
    total = sum(p.numel() for p in model.parameters())
    core = model.model
    frozen = sum(p.numel() for part in (core.vq, core.feature_encoders.semantic_encoder,
                                        core.feature_encoders.identity_encoder) for p in part.parameters())
    assert f"({total:,}) in total" in text and f"({total - frozen:,}) trainable" in text
    assert "4 routed experts (width 32), top-2 per token" in text  # tiny(): 4 experts, top-2, width 32
    assert "32x32 px, 16 tokens per image (4x4 grid), codebook of 16 codes" in text  # 32 px / 8 = 4 -> 16 tokens
    assert "1027 ids = 1000 text + 10 special + 16 image codes + 1 `[MASK]`" in text
    assert "| visual-question-answering | SynthFace | accuracy | 0.75 |" in text
    package_snippet, remote_snippet = card_sections(text)
    assert f'from_pretrained("{REPO}")' in package_snippet and "import transformers_f2ace" in package_snippet
    assert "trust_remote_code=True" in remote_snippet and "transformers_f2ace" not in remote_snippet
    for snippet in (package_snippet, remote_snippet):
        assert "apply_chat_template" in snippet and "generate_images" in snippet
        assert "num_inference_steps=16, guidance_scale=1.75" in snippet  # the config's sampling defaults
    assert validate_card_metadata(str(card)) == []


def test_card_metadata_validation_rejects_bad_metadata():
    good = "---\nlicense: apache-2.0\ntags:\n- face\n---\n# card\n"
    assert validate_card_metadata(good) == []
    bad = ("---\nlicense: not-a-license\ntags: 3\nmodel-index:\n- name: m\n  results:\n  - task: {}\n"
           "    dataset: {type: d}\n    metrics:\n    - type: accuracy\n---\n")
    errors = validate_card_metadata(bad)
    assert any("license" in e for e in errors) and any('"tags"' in e for e in errors)
    assert any("task.type" in e for e in errors) and any('"type" and "value"' in e for e in errors)
    assert validate_card_metadata("---\n[unclosed\n---\n")[0].startswith("the metadata is not valid YAML")


def test_adapter_card(checkpoint):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    card = render_adapter_card(config, REPO, repo_id="org/unif2ace-lora", datasets="org/synthface")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == REPO and data["datasets"] == ["org/synthface"]
    assert {"unif2ace", "peft", "lora", f"base_model:adapter:{REPO}"} <= set(data["tags"])
    assert "LORA, rank 4, alpha 8" in card.text and "`q_proj`, `v_proj`" in card.text
    [snippet] = card_sections(card.text)
    assert 'PeftModel.from_pretrained(base, "org/unif2ace-lora")' in snippet
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}")' in snippet
    assert validate_card_metadata(str(card)) == []


def test_bad_repo_ids_are_refused_before_anything_is_saved(checkpoint):
    _, model, processor = checkpoint
    for repo_id in ("org/bad name", "a/b/c", "org/-dash--"):
        with pytest.raises(ValueError, match=f"repo_id '{re.escape(repo_id)}' is not a valid Hub repo id"):
            render_model_card(model, processor, repo_id=repo_id)
    with pytest.raises(ValueError, match="base_model 'not a repo' is not a valid Hub repo id"):
        render_model_card(model, processor, repo_id=REPO, base_model="not a repo")


# ------------------------------------------------------------------------------------------------------------ pushes
def test_push_is_one_commit_with_our_card_and_pulls_back(hub, client, checkpoint, pushed, tmp_path):
    folder, model, processor = checkpoint
    history = hub.history(REPO)
    assert [c.title for c in history] == ["Upload UniF²ace checkpoint", "initial commit"]
    assert history[0].id == pushed
    head = history[0].files
    expected = saved_files(model, processor, tmp_path, max_shard_size=SHARD) | {"README.md", ".gitattributes"}
    assert set(head) == expected
    shards = sorted(p for p in head if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p))
    assert len(shards) > 1 and all(head[p].lfs for p in shards) and not head["config.json"].lfs
    assert all(hub.lfs_puts[REPO, head[p].sha256] == 1 for p in shards)  # each LFS object uploaded exactly once
    card = hub.read(REPO, "README.md").decode()
    assert card == str(render_model_card(model, processor, repo_id=REPO, **CARD_ARGS))
    assert any(r.route == "validate_yaml" and r.status == 200 for r in hub.log)  # the client had the card checked

    pulled = client.run(
        """
        model = AutoModelForImageTextToText.from_pretrained(args["repo"])
        processor = AutoProcessor.from_pretrained(args["repo"])
        info = HfApi().model_info(args["repo"])
        result = dict(digest=weights_digest(model), processor=type(processor).__name__, ids=t2i_ids(processor),
                      sha=info.sha, library=info.library_name, card_tags=info.card_data.tags)
        """,
        repo=REPO,
    )
    assert pulled["digest"] == weights_digest(model)
    assert pulled["processor"] == "UniF2aceProcessor"
    assert pulled["ids"] == processor(text=[PROMPT], mode="t2i", return_tensors="pt")["input_ids"].tolist()
    assert pulled["sha"] == pushed and pulled["library"] == "transformers" and "unif2ace" in pulled["card_tags"]


def test_card_usage_snippet_runs_against_the_hub(hub, client, pushed, workdir):
    package_snippet, _ = card_sections(hub.read(REPO, "README.md").decode())
    answer = client.run(package_snippet + "\nresult = Image.open('generated_face.png').size\n", timeout=300)
    resolution = UniF2aceConfig.tiny().vq_config.resolution
    assert answer == [resolution, resolution]


def test_interrupted_upload_keeps_the_staging_folder_and_a_rerun_completes_it(hub, client, checkpoint, tmp_path):
    folder, model, processor = checkpoint
    repo, staging = "org/resumed", tmp_path / "staging"
    attempt = """
        from transformers_f2ace.hub import HubUploadError
        try:
            result = {"oid": OPERATION.oid}
        except HubUploadError as error:
            result = {"error": str(error), "folder": str(error.folder)}
    """
    push = attempt.replace("OPERATION", 'hub.push_to_hub(*load_local(args["folder"]), args["repo"], '
                                        'max_shard_size=args["shard"], staging_dir=args["staging"])')
    rerun = attempt.replace("OPERATION", 'hub.upload_checkpoint(args["staging"], args["repo"])')
    paths = dict(folder=str(folder), repo=repo, shard=SHARD, staging=str(staging))

    hub.fail("lfs_put", status=507, after=1)  # the second LFS object is refused ("insufficient storage")
    first = client.run(push, **paths)
    hub.clear_failures()
    assert first["folder"] == str(staging) and f"unif2ace push {staging} {repo}" in first["error"]
    assert "Error while uploading 'model-" in first["error"]
    assert "HfHubHTTPError: Server error '507 Insufficient Storage'" in first["error"]
    assert "/_lfs/" not in first["error"]  # no upload URL (they can carry signatures) in the message
    assert [c.title for c in hub.history(repo)] == ["initial commit"]  # nothing half-committed
    staged = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}
    assert staged == saved_files(model, processor, tmp_path / "reference", max_shard_size=SHARD) | {"README.md"}
    uploaded_before = dict(hub.lfs_puts)

    hub.fail("commit", status=500, times=1)  # now every object uploads but the commit itself fails
    second = client.run(rerun, **paths)
    hub.clear_failures()
    assert "500" in second["error"] and [c.title for c in hub.history(repo)] == ["initial commit"]

    third = client.run(rerun, **paths)
    history = hub.history(repo)
    assert [c.title for c in history] == ["Upload UniF²ace checkpoint", "initial commit"]
    assert third["oid"] == history[0].id
    assert set(history[0].files) == staged | {".gitattributes"}
    shard_oids = [e.sha256 for p, e in history[0].files.items() if e.lfs]
    assert all(hub.lfs_puts[repo, oid] == 1 for oid in shard_oids)  # the rerun did not upload an object twice
    assert sum(uploaded_before.get((repo, oid), 0) for oid in shard_oids) == 1  # the first run got one through
    for path in staged:
        assert hub.read(repo, path) == (staging / path).read_bytes(), path


def test_revisions_branch_tag_and_commit(hub, client, checkpoint, pushed):
    folder, model, _ = checkpoint
    result = client.run(
        """
        torch.manual_seed(1)
        model, processor = load_local(args["folder"])
        other = type(model)(model.config).eval()
        dev = hub.push_to_hub(other, processor, args["repo"], revision="dev", commit_message="dev weights").oid
        HfApi().create_tag(args["repo"], tag="v1.0", revision=args["main"])
        digests = {rev: weights_digest(AutoModelForImageTextToText.from_pretrained(args["repo"], revision=rev))
                   for rev in ("dev", "v1.0", dev, "main")}
        result = dict(other=weights_digest(other), dev=dev, digests=digests)
        """,
        folder=str(folder), repo=REPO, main=pushed,
    )
    assert result["other"] != weights_digest(model)
    assert result["digests"] == {"dev": result["other"], result["dev"]: result["other"],
                                 "v1.0": weights_digest(model), "main": weights_digest(model)}
    dev_files = hub.head(REPO, "dev").files
    # the branch started from main's sharded weights; the unsharded push replaced them in the same commit
    assert "model.safetensors" in dev_files and not any(p.startswith("model-0") for p in dev_files)
    assert "model.safetensors.index.json" not in dev_files
    assert [c.title for c in hub.history(REPO, "dev")][:2] == ["dev weights", "Upload UniF²ace checkpoint"]
    assert hub.head(REPO).id == pushed  # main untouched


def test_private_repo_needs_an_authorised_token(hub, accounts, client, checkpoint, tmp_path):
    folder, model, _ = checkpoint
    result = client.run(
        """
        from huggingface_hub.errors import RepositoryNotFoundError
        hub.push_to_hub(*load_local(args["folder"]), args["repo"], private=True)
        outcome = {"own": weights_digest(AutoModelForImageTextToText.from_pretrained(args["repo"]))}
        # a rejected token is an HTTP error, not "repo not found": transformers then falls back to cached files, so
        # the revoked token is tried on a cold cache
        cases = (("anonymous", False, None), ("outsider", args["outsider"], None),
                 ("revoked", args["revoked"], args["cold_cache"]))
        for name, token, cache_dir in cases:
            try:
                AutoModelForImageTextToText.from_pretrained(args["repo"], token=token, cache_dir=cache_dir)
                outcome[name] = "loaded"
            except Exception as error:
                outcome[name] = f"{type(error).__name__}: {error}"
        try:
            HfApi().model_info(args["repo"], token=False)
        except RepositoryNotFoundError as error:
            outcome["api"] = str(error)
        result = outcome
        """,
        folder=str(folder), repo="org/private-tiny", outsider=accounts.outsider, revoked=accounts.revoked,
        cold_cache=str(tmp_path / "cold"),
    )
    assert hub.repo("org/private-tiny").private
    assert result["own"] == weights_digest(model)
    for name in ("anonymous", "outsider"):
        assert result[name].startswith("OSError: org/private-tiny is not a local folder and is not a valid model "
                                       "identifier"), result[name]
        assert "private repository, make sure to pass a token" in result[name]
    assert result["revoked"].startswith("OSError")
    assert "Invalid credentials in Authorization header" in result["revoked"]
    assert "Repository Not Found" in result["api"]
    assert not any(secret in json.dumps(result) for secret in accounts.secrets)


def test_pull_errors_say_what_happened(hub, client, pushed):
    result = client.run(
        """
        outcome = {}
        for name, repo, kwargs in (("missing repo", "org/does-not-exist", {}),
                                   ("missing revision", args["repo"], {"revision": "no-such-branch"}),
                                   ("malformed id", "org/bad name", {})):
            try:
                AutoModelForImageTextToText.from_pretrained(repo, **kwargs)
            except Exception as error:
                outcome[name] = [[c.__name__ for c in type(error).__mro__], str(error)]
        result = outcome
        """,
        repo=REPO,
    )
    types, message = result["missing repo"]
    assert "OSError" in types
    assert "org/does-not-exist is not a local folder and is not a valid model identifier" in message
    types, message = result["missing revision"]
    assert "OSError" in types
    assert "no-such-branch is not a valid git identifier (branch name, tag name or commit id)" in message
    types, message = result["malformed id"]
    assert "OSError" in types and "Repo id must use alphanumeric chars" in message and "'org/bad name'" in message


def test_push_errors_say_what_happened(hub, accounts, client, checkpoint, tmp_path):
    folder = checkpoint[0]
    result = client.run(
        """
        model, processor = load_local(args["folder"])
        outcome = {}
        cases = [("malformed", "org/bad name", None), ("too many slashes", "a/b/c", None),
                 ("revoked", "org/denied", args["revoked"]), ("read-only", "org/denied", args["read_only"]),
                 ("outsider", "org/denied", args["outsider"]), ("no token", "org/denied", None)]
        for name, repo, token in cases:
            saved_token = os.environ.pop("HF_TOKEN") if name == "no token" else None
            try:
                hub.push_to_hub(model, processor, repo, token=token, staging_dir=args["staging"] + "/" + name)
                outcome[name] = "pushed"
            except Exception as error:
                outcome[name] = [type(error).__name__, str(error)]
            finally:
                if saved_token:
                    os.environ["HF_TOKEN"] = saved_token
        result = outcome
        """,
        folder=str(folder), staging=str(tmp_path), revoked=accounts.revoked, read_only=accounts.read_only,
        outsider=accounts.outsider,
    )
    assert result["malformed"][0] == "ValueError"
    assert "repo_id 'org/bad name' is not a valid Hub repo id" in result["malformed"][1]
    assert result["too many slashes"][0] == "ValueError" and "'a/b/c'" in result["too many slashes"][1]
    assert result["revoked"] == ["PermissionError", "The Hub rejected the token (HTTP 401): it is invalid, expired or "
                                 "revoked. Create a new one with write access and pass it as token=... or HF_TOKEN."]
    assert result["read-only"] == ["PermissionError",
                                   "The token is read-only: pushing needs a token with write access."]
    assert result["no token"][0] == "PermissionError" and "none was found" in result["no token"][1]
    assert result["outsider"][0] == "HubUploadError"
    assert "You don't have the rights to write to the namespace org" in result["outsider"][1]
    assert ("model", "org/denied") not in hub.repos
    # token errors stop before anything is saved; the outsider's checkpoint was staged and is kept for a rerun
    assert not (tmp_path / "revoked").exists() and not (tmp_path / "no token").exists()
    assert (tmp_path / "outsider" / "README.md").exists()
    assert not any(secret in json.dumps(result) for secret in accounts.secrets)


def test_plain_model_and_processor_push_to_hub_keep_our_card(hub, client, checkpoint):
    folder, model, processor = checkpoint
    client.run(
        """
        model, processor = load_local(args["folder"])
        model.push_to_hub(args["repo"])
        processor.push_to_hub(args["repo"])
        """,
        folder=str(folder), repo="org/plain",
    )
    titles = ["Upload processor", "Upload UniF2aceForConditionalGeneration", "initial commit"]  # transformers' defaults
    assert [c.title for c in hub.history("org/plain")] == titles
    card = hub.read("org/plain", "README.md").decode()
    expected = str(render_model_card(model, repo_id="org/plain"))
    assert card.split("\n---\n", 1)[1] == expected.split("\n---\n", 1)[1]  # the processor push kept our card's text
    assert "library_name: transformers" in card and "- unif2ace" in card


def test_peft_adapter_push_and_pull(hub, client, pushed):
    result = client.run(
        """
        from peft import LoraConfig, PeftModel, get_peft_model
        torch.manual_seed(0)
        base = AutoModelForImageTextToText.from_pretrained(args["repo"]).eval()
        base_digest = weights_digest(base)
        adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)  # LoRA starts as a no-op: give it weights that change the output
        adapted.eval()
        ids = AutoProcessor.from_pretrained(args["repo"])(text=["a man"], mode="t2i", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            reference = adapted(ids).logits
        hub.push_adapter_to_hub(adapted, args["adapter"], base_repo_id=args["repo"])
        adapted.push_to_hub(args["plain"])  # PEFT's own push
        outcome = {"reference": weights_digest(adapted)}
        for name in ("adapter", "plain"):
            fresh = AutoModelForImageTextToText.from_pretrained(args["repo"]).eval()
            assert weights_digest(fresh) == base_digest
            pulled = PeftModel.from_pretrained(fresh, args[name]).eval()
            with torch.no_grad():
                logits = pulled(ids).logits
                with pulled.disable_adapter():
                    plain_logits = pulled(ids).logits
            outcome[name] = dict(digest=weights_digest(pulled), diff=(logits - reference).abs().max().item(),
                                 adapter_effect=(logits - plain_logits).abs().max().item())
        result = outcome
        """,
        repo=REPO, adapter="org/unif2ace-lora", plain="org/unif2ace-lora-plain",
    )
    for name in ("adapter", "plain"):
        assert result[name]["digest"] == result["reference"]
        assert result[name]["diff"] == 0.0 and result[name]["adapter_effect"] > 1e-3
    assert [c.title for c in hub.history("org/unif2ace-lora")] == ["Upload UniF²ace adapter", "initial commit"]
    files = hub.head("org/unif2ace-lora").files
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    card = hub.read("org/unif2ace-lora", "README.md").decode()
    assert "library_name: peft" in card and f"base_model: {REPO}" in card
    assert 'PeftModel.from_pretrained(base, "org/unif2ace-lora")' in card


def test_trainer_push_to_hub(hub, client, checkpoint, tmp_path):
    folder, model, _ = checkpoint
    result = client.run(
        """
        from PIL import Image
        from transformers import TrainingArguments
        from transformers_f2ace.training import UniF2aceTrainer
        model, processor = load_local(args["folder"])
        model.train()
        faces = [Image.new("RGB", (32, 32), colour) for colour in ((200, 0, 0), (0, 0, 200))]
        records = [{"image": faces[0], "caption": "a woman with red hair"},
                   {"image": faces[1], "conversations": [{"from": "human", "value": "is the person smiling?"},
                                                         {"from": "gpt", "value": "yes"}]}]
        training = TrainingArguments(output_dir=args["output"], push_to_hub=True, hub_model_id=args["repo"],
                                     max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = UniF2aceTrainer(model=model, args=training, train_dataset=records, processing_class=processor)
        trainer.train()
        trainer.push_to_hub()
        pulled = AutoModelForImageTextToText.from_pretrained(args["repo"])
        result = dict(trained=weights_digest(trainer.model), pulled=weights_digest(pulled),
                      processor=type(AutoProcessor.from_pretrained(args["repo"])).__name__)
        """,
        folder=str(folder), output=str(tmp_path / "run"), repo="org/trained",
    )
    assert result["trained"] != weights_digest(model)  # two steps changed the weights
    assert result["pulled"] == result["trained"] and result["processor"] == "UniF2aceProcessor"
    assert hub.history("org/trained")[0].title == "End of training"
    files = set(hub.head("org/trained").files)
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "training_args.bin",
            "README.md", "modeling_unif2ace.py"} <= files


# ------------------------------------------------------------------------------------ other interpreters: no package
REMOTE_CODE_SCRIPT = BLOCK_PACKAGE + WEIGHTS_DIGEST + textwrap.dedent(
    """
    import json
    import re
    from pathlib import Path

    from huggingface_hub import hf_hub_download
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo, out = sys.argv[1:3]
    outcome = {}
    try:
        AutoModelForImageTextToText.from_pretrained(repo)
    except Exception as error:  # without the package and without trust, loading must refuse
        outcome["refused"] = type(error).__name__
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
    outcome.update(digest=weights_digest(model), module=type(model).__module__,
                   imported="transformers_f2ace" in sys.modules)
    try:
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        outcome["processor"] = type(processor).__name__
    except Exception as error:
        outcome["processor"] = f"{type(error).__name__}: {error}"
    # the model card's trust_remote_code snippet, as a user would paste it
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    snippet = re.findall(r"```python\\n(.*?)```", card, re.DOTALL)[1]
    try:
        exec(snippet, {})
        outcome["snippet"] = list(Image.open("generated_face_remote_code.png").size)
    except Exception as error:
        outcome["snippet"] = f"{type(error).__name__}: {error}"
    Path(out).write_text(json.dumps(outcome))
    """
)


@pytest.fixture(scope="module")
def remote_code_run(hub, pushed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote_code")
    Image.new("RGB", (40, 40), (200, 120, 90)).save(folder / "face.png")
    script = folder / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), REPO, str(folder / "out.json")], capture_output=True,
                            text=True, env=hub_env(hub, folder / "hf_home"), cwd=folder, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "out.json").read_text())


def test_trust_remote_code_from_the_hub_without_the_package(remote_code_run, checkpoint):
    assert remote_code_run["refused"] is not None
    assert remote_code_run["module"].startswith("transformers_modules") and not remote_code_run["imported"]
    assert remote_code_run["digest"] == weights_digest(checkpoint[1])


def test_trust_remote_code_processor_and_card_snippet_from_the_hub(remote_code_run):
    assert remote_code_run["processor"] == "UniF2aceProcessor"
    resolution = UniF2aceConfig.tiny().vq_config.resolution
    assert remote_code_run["snippet"] == [resolution, resolution]


OFFLINE_SCRIPT = WEIGHTS_DIGEST + textwrap.dedent(
    """
    import json, sys
    import transformers_f2ace  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo, cold_cache, out = sys.argv[1:4]
    outcome = {"digest": weights_digest(AutoModelForImageTextToText.from_pretrained(repo)),
               "processor": type(AutoProcessor.from_pretrained(repo)).__name__}
    try:
        AutoModelForImageTextToText.from_pretrained(repo, cache_dir=cold_cache)
    except OSError as error:
        outcome["cold"] = str(error)
    open(out, "w").write(json.dumps(outcome))
    """
)


def test_offline_mode_uses_a_warm_cache_and_explains_a_cold_one(hub, client, client_home, pushed, checkpoint,
                                                                 tmp_path):
    client.run("AutoModelForImageTextToText.from_pretrained(args['repo']); AutoProcessor.from_pretrained(args['repo'])",
               repo=REPO)  # warm the client's cache (a no-op when an earlier test already did)
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE_SCRIPT)
    requests_before = len(hub.log)
    result = subprocess.run(
        [sys.executable, str(script), REPO, str(tmp_path / "cold"), str(tmp_path / "out.json")], capture_output=True,
        text=True, env=hub_env(hub, client_home, HF_HUB_OFFLINE="1"), cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads((tmp_path / "out.json").read_text())
    assert len(hub.log) == requests_before  # offline: not one request reached the server
    assert outcome["digest"] == weights_digest(checkpoint[1]) and outcome["processor"] == "UniF2aceProcessor"
    assert "couldn't find them in the cached files" in outcome["cold"]
    assert "offline mode" in outcome["cold"]


# -------------------------------------------------------------------------------------------------------------- CLI
def test_cli_push_of_a_folder_with_an_adapter(hub, accounts, checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    source, model, _ = checkpoint
    folder = shutil.copytree(source, tmp_path / "checkpoint")  # a saved checkpoint without a README
    adapted = get_peft_model(UniF2aceForConditionalGeneration(model.config), LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.save_pretrained(folder / "lora-demo")
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text(accounts.write)  # the token file of `hf auth login`, no HF_TOKEN
    result = subprocess.run(
        [sys.executable, "-m", "transformers_f2ace.cli", "push", str(folder), "org/cli-tiny", "--private",
         "--branch", "release", "--commit-message", "CLI upload", "--base-model", REPO],
        capture_output=True, text=True, env=hub_env(hub, home), cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    head = hub.head("org/cli-tiny", "release")
    assert f"Pushed {folder} to org/cli-tiny (release) in commit {head.id}" in result.stdout
    assert hub.repo("org/cli-tiny").private
    assert [c.title for c in hub.history("org/cli-tiny", "release")] == ["CLI upload", "initial commit"]
    assert [c.title for c in hub.history("org/cli-tiny")] == ["initial commit"]
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(head.files) == local | {".gitattributes"} and "lora-demo/adapter_model.safetensors" in local
    card = hub.read("org/cli-tiny", "README.md", "release").decode()
    assert f"base_model: {REPO}" in card and "| `lora-demo` | LORA rank 2 on `q_proj` |" in card
    for secret in accounts.secrets:
        assert secret not in result.stdout + result.stderr and secret not in card


# --------------------------------------------------------------------------------------------------- session checks
def test_no_token_was_printed_and_every_request_was_understood(hub, accounts, client):
    """Runs last: the client process's whole output and every card on the server are free of tokens, and the server
    implemented every request the real clients sent."""
    output = client.output()
    for secret in accounts.secrets:
        assert secret not in output
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            if "README.md" in commit.files:
                card = hub.object_path(commit.files["README.md"].sha256).read_text()
                assert not any(secret in card for secret in accounts.secrets)
    assert hub.unhandled == []
