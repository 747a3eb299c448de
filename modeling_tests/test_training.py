"""UniF2aceDataCollator (mixed MMU + T2I batches) and UniF2aceTrainer on the tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration
from transformers_f2ace.training import (
    ShuffledLengthGroupedSampler,
    StepSeededCollator,
    UniF2aceDataCollator,
    UniF2aceTrainer,
)


COLOURS = [(200, 0, 0), (0, 0, 200), (0, 200, 0), (90, 90, 90), (250, 200, 0), (0, 180, 180)]


def face(background: tuple[int, int, int], skin: tuple[int, int, int] = (250, 220, 180)) -> Image.Image:
    image = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(image).ellipse((8, 6, 24, 26), fill=skin)
    return image


def mixed_records() -> list[dict]:
    """T2I, ShareGPT MMU, T2I, HF-messages MMU (system line, two turns, list content)."""
    return [
        {"image": Image.new("RGB", (32, 32), COLOURS[0]), "caption": "a smiling woman with long red curly hair"},
        {"image": Image.new("RGB", (40, 40), COLOURS[1]),
         "conversations": [{"from": "human", "value": "<image>\nis the person smiling?"},
                           {"from": "gpt", "value": "yes"}]},
        {"image": Image.new("RGB", (32, 32), COLOURS[2]), "caption": "a man"},
        {"image": Image.new("RGB", (32, 32), COLOURS[3]),
         "messages": [
             {"role": "system", "content": "describe the face."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the hair?"}]},
             {"role": "assistant", "content": "brown curly hair"},
             {"role": "user", "content": "glasses?"},
             {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
         ]},
    ]


ANSWERS = {1: ["yes"], 3: ["brown curly hair", "no"]}  # MMU row -> its assistant answers
T2I_ROWS, MMU_ROWS = [0, 2], [1, 3]


def image_span(row: torch.Tensor, config: UniF2aceConfig) -> list[int]:
    """Positions strictly between <|soi|> and <|eoi|> (naive scan)."""
    ids = row.tolist()
    return list(range(ids.index(config.soi_token_id) + 1, ids.index(config.eoi_token_id)))


def colour_of(view: torch.Tensor) -> list[float]:
    """Mean channel value of a [-1, 1] view, mapped back to [0, 255]."""
    return ((view.mean(dim=(1, 2)) + 1) * 127.5).tolist()


@pytest.fixture
def one_thread():
    """The trainer tests run single-threaded: tiny matmuls gain nothing from threads, and a shared CPU punishes them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------ layout
def test_mixed_batch_layout(tiny_config, tiny_processor):
    collator = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0, condition_dropout_prob=0.0)
    batch = collator(mixed_records())
    tokenizer, config = tiny_processor.tokenizer, tiny_config
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    num_tokens = config.num_image_tokens
    assert ids.shape == attention.shape == labels.shape == batch["image_generation_mask"].shape
    # left padding: pads (and only pads) carry attention 0, every row ends with a real token
    assert torch.equal(attention, (ids != config.pad_token_id).long())
    assert bool(attention[:, -1].all()) and bool((attention[:, 1:] >= attention[:, :-1]).all())
    # task tokens in record order; each row one image span of [MASK] placeholders
    assert [int(row[row != config.pad_token_id][0]) for row in ids] == [
        config.t2i_token_id, config.mmu_token_id, config.t2i_token_id, config.mmu_token_id
    ]
    for row in ids:
        span = image_span(row, config)
        assert len(span) == num_tokens and bool((row[span] == config.image_token_id).all())

    # labels: the answers (+ EOS) of MMU rows, unshifted copies of input_ids; nothing on T2I rows
    for row in T2I_ROWS:
        assert bool((labels[row] == -100).all())
    for row, answers in ANSWERS.items():
        kept = labels[row] != -100
        assert torch.equal(labels[row][kept], ids[row][kept])
        assert tokenizer.decode(labels[row][kept]) == "".join(f" {answer}<|endoftext|>" for answer in answers)

    # generation targets: inside T2I image spans only, n = max(1, round(N cos(pi t / 2))) with t drawn first
    generation_mask, ratio = batch["image_generation_mask"], batch["mask_ratio"]
    t = torch.rand(len(T2I_ROWS), generator=torch.Generator().manual_seed(0))
    for k, row in enumerate(T2I_ROWS):
        span = image_span(ids[row], config)
        outside = torch.ones(ids.shape[1], dtype=torch.bool)
        outside[span] = False
        assert not bool(generation_mask[row][outside].any())
        expected = max(1, round(num_tokens * math.cos(math.pi * float(t[k]) / 2)))
        assert int(generation_mask[row].sum()) == expected
        assert ratio[row].item() == pytest.approx(expected / num_tokens)
    for row in MMU_ROWS:
        assert not bool(generation_mask[row].any()) and ratio[row].item() == 1.0

    # one VQ image per span in row order; encoder views for the MMU rows only, in row order
    assert batch["pixel_values"].shape == (4, 3, config.vq_config.resolution, config.vq_config.resolution)
    for row, colour in enumerate(COLOURS[:4]):
        assert colour_of(batch["pixel_values"][row]) == pytest.approx(colour, abs=1.0)
    assert batch["semantic_pixel_values"].shape[0] == batch["identity_pixel_values"].shape[0] == len(MMU_ROWS)
    for k, row in enumerate(MMU_ROWS):
        assert colour_of(batch["identity_pixel_values"][k]) == pytest.approx(COLOURS[row], abs=1.0)


def test_single_kind_batches(tiny_config, tiny_processor):
    collator = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0)
    records = mixed_records()
    t2i = collator([records[i] for i in T2I_ROWS])
    assert "labels" not in t2i  # a text loss over zero tokens would be NaN
    assert "semantic_pixel_values" not in t2i and "identity_pixel_values" not in t2i
    assert t2i["pixel_values"].shape[0] == 2 and int(t2i["image_generation_mask"].sum()) >= 2
    mmu = collator([records[i] for i in MMU_ROWS])
    assert "image_generation_mask" not in mmu and "mask_ratio" not in mmu
    assert mmu["identity_pixel_values"].shape[0] == 2 and int((mmu["labels"] != -100).sum()) > 0


def test_image_marker_positions_and_message_formats(tiny_config, tiny_processor):
    """The image goes where the record puts it (a later turn here); answers before it still get their labels."""
    collator = UniF2aceDataCollator(tiny_processor)
    record = {"image": face(COLOURS[0]), "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "<image>\nis the person smiling?"}, {"from": "gpt", "value": "yes"},
    ]}
    batch = collator([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    soi = ids.tolist().index(tiny_config.soi_token_id)
    decode = tiny_processor.tokenizer.decode
    assert decode(ids[:soi]).endswith("ASSISTANT: hi<|endoftext|>\n") and "ASSISTANT: yes" in decode(ids[soi:])
    assert tiny_processor.tokenizer.decode(labels[labels != -100]) == " hi<|endoftext|> yes<|endoftext|>"


# ----------------------------------------------------------------------------------------------- randomness, dropout
def test_seeded_reproducibility(tiny_config, tiny_processor):
    records = mixed_records()
    first = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=3, condition_dropout_prob=0.5)
    second = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=3, condition_dropout_prob=0.5)
    a, b = first(records), second(records)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the stream advances between batches, and another seed draws other masks
    masks = [first(records)["image_generation_mask"] for _ in range(3)]
    other_seed = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=4)
    masks.append(other_seed(records)["image_generation_mask"])
    assert all(not torch.equal(a["image_generation_mask"], mask) for mask in masks)
    # an explicit generator is used as given
    explicit = UniF2aceDataCollator(tiny_processor, generator=torch.Generator().manual_seed(3),
                                    condition_dropout_prob=0.5)
    assert torch.equal(explicit(records)["image_generation_mask"], a["image_generation_mask"])


def test_condition_dropout_masks_exactly_the_prompt(tiny_config, tiny_processor, tiny_model):
    records = mixed_records()
    dropped = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0, condition_dropout_prob=1.0)(records)
    kept = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0, condition_dropout_prob=0.0)(records)
    ids, pad = dropped["input_ids"], tiny_config.pad_token_id
    assert torch.equal(dropped["input_ids"], kept["input_ids"])
    assert torch.equal(kept["attention_mask"], (ids != pad).long())
    for row in MMU_ROWS:
        assert torch.equal(dropped["attention_mask"][row], (ids[row] != pad).long())
    for row in T2I_ROWS:
        hidden = (dropped["attention_mask"][row] == 0) & (ids[row] != pad)
        expected = tiny_processor.tokenizer(records[row]["caption"], add_special_tokens=False)["input_ids"]
        assert ids[row][hidden].tolist() == expected
    # the sampler's unconditional half masks the same positions
    _, prompt = tiny_model._image_prompt_layout(ids[T2I_ROWS])
    assert torch.equal(prompt, (dropped["attention_mask"][T2I_ROWS] == 0) & (ids[T2I_ROWS] != pad))


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "record, message",
    [
        ({"caption": "a man"}, "exactly one image"),
        ({"image": face(COLOURS[0])}, "exactly one image and one of caption"),
        ({"image": face(COLOURS[0]), "caption": "a", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"image": face(COLOURS[0]), "caption": 3}, "caption must be a string"),
        ({"image": face(COLOURS[0]), "conversations": [{"from": "bot", "value": "x"}]}, "ShareGPT 'from'"),
        ({"image": face(COLOURS[0]), "messages": [{"role": "user", "content": "x"}]}, "assistant answer"),
        ({"image": face(COLOURS[0]), "messages": [{"role": "robot", "content": "x"}]}, "message role"),
        ({"image": face(COLOURS[0]), "messages": [{"text": "x"}]}, "chat turn"),
        ({"image": face(COLOURS[0]), "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "content parts"),
        ({"image": face(COLOURS[0]), "messages": "hello"}, "non-empty list"),
        ({"image": face(COLOURS[0]), "conversations": [
            {"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "no"}]}, "one image"),
        (["image", "caption"], "records are mappings"),
    ],
)
def test_unknown_records_raise(tiny_processor, record, message):
    with pytest.raises(ValueError, match=message):
        UniF2aceDataCollator(tiny_processor)([record])


def test_constructor_checks(tiny_config, tiny_processor):
    collator = UniF2aceDataCollator.from_config(tiny_processor, UniF2aceConfig.tiny(mask_schedule="linear",
                                                                                     condition_dropout_prob=0.3))
    assert (collator.mask_schedule, collator.condition_dropout_prob, collator.min_masked) == ("linear", 0.3, 1)
    with pytest.raises(ValueError, match="num_image_tokens"):
        UniF2aceDataCollator.from_config(tiny_processor, UniF2aceConfig.small())
    with pytest.raises(ValueError, match="mask_schedule"):
        UniF2aceDataCollator(tiny_processor, mask_schedule="exp")
    with pytest.raises(ValueError, match="condition_dropout_prob"):
        UniF2aceDataCollator(tiny_processor, condition_dropout_prob=1.5)
    with pytest.raises(ValueError, match="min_masked"):
        UniF2aceDataCollator(tiny_processor, min_masked=tiny_config.num_image_tokens + 1)
    with pytest.raises(ValueError, match="records is empty"):
        UniF2aceDataCollator(tiny_processor)([])


# ------------------------------------------------------------------------------------------------------- model loss
def test_mixed_batch_loss_matches_naive_terms(tiny_processor):
    config = UniF2aceConfig.tiny(output_router_logits=True)
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    batch = UniF2aceDataCollator.from_config(tiny_processor, config, seed=1)(mixed_records())
    with torch.no_grad():
        out = model(**batch)
    d3diff = out.mask_loss + config.d3diff_alpha * out.score_loss
    assert torch.isfinite(out.loss)
    total = out.text_loss + d3diff + config.router_aux_loss_coef * out.aux_loss
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)

    # text loss: next-token CE over the labelled answer tokens
    logits, labels = out.logits, batch["labels"]
    text = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.text_loss.item() == pytest.approx(text.item(), rel=1e-5)

    # D3Diff: image i of pixel_values is the target of row i's span; CE over image codes at the masked positions, and
    # the Bayes score entropy rho * nll + 1 + rho * log(1 - r)
    codes = model.model.encode_images(batch["pixel_values"])
    offset, size = config.image_token_offset, config.codebook_size
    nll, score = [], []
    for row in T2I_ROWS:
        span = image_span(batch["input_ids"][row], config)
        r = batch["mask_ratio"][row].item()
        rho = (1 - r) / r
        for j, position in enumerate(span):
            if batch["image_generation_mask"][row, position]:
                log_probs = logits[row, position, offset:offset + size].log_softmax(-1)
                nll.append(-log_probs[codes[row, j]].item())
                score.append(rho * nll[-1] + 1 + (rho * math.log(1 - r) if r < 1 else 0.0))
    assert out.mask_loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert out.score_loss.item() == pytest.approx(sum(score) / len(score), rel=1e-5)


def test_single_kind_batches_give_finite_losses(tiny_config, tiny_processor, tiny_model):
    collator = UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0)
    records = mixed_records()
    with torch.no_grad():
        t2i = tiny_model(**collator([records[i] for i in T2I_ROWS]))
        mmu = tiny_model(**collator([records[i] for i in MMU_ROWS]))
    assert t2i.text_loss is None and torch.isfinite(t2i.loss)
    d3diff = t2i.mask_loss + tiny_config.d3diff_alpha * t2i.score_loss
    assert t2i.loss.item() == pytest.approx(d3diff.item(), rel=1e-6)
    assert mmu.mask_loss is None and torch.isfinite(mmu.loss) and mmu.loss.item() == pytest.approx(mmu.text_loss.item())


# ---------------------------------------------------------------------------------------------------------- trainer
def training_records() -> list[dict]:
    """4 T2I + 4 MMU records over 4 distinct faces."""
    faces = [face(COLOURS[0]), face(COLOURS[1], (120, 80, 50)), face(COLOURS[2]), face(COLOURS[3], (120, 80, 50))]
    captions = ["a smiling woman with red hair", "a man with a short black beard", "round glasses and a blue hat",
                "brown eyes and earrings"]
    chats = [
        [{"from": "human", "value": "<image>\nis the person smiling?"}, {"from": "gpt", "value": "yes"}],
        [{"from": "human", "value": "what colour is the hair?"}, {"from": "gpt", "value": "black"}],
        [{"from": "human", "value": "describe the face."}, {"from": "gpt", "value": "a woman with round glasses"}],
        [{"from": "human", "value": "is the person smiling?"}, {"from": "gpt", "value": "no"}],
    ]
    return ([{"image": f, "caption": c} for f, c in zip(faces, captions)]
            + [{"image": f, "conversations": chat} for f, chat in zip(faces, chats)])


def trainer_for(model, processor, output_dir, records, **arguments) -> UniF2aceTrainer:
    """Default TrainingArguments (remove_unused_columns=True included) plus `arguments`; the collator comes from
    `processing_class`."""
    args = TrainingArguments(output_dir=str(output_dir), report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, seed=0, disable_tqdm=True, **arguments)
    return UniF2aceTrainer(model=model, args=args, train_dataset=records, processing_class=processor)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the VQ tokenizer and of the CLIP / identity encoders."""
    encoders = model.model.feature_encoders
    parts = {"vq": model.model.vq, "semantic": encoders.semantic_encoder, "identity": encoders.identity_encoder}
    return {f"{name}.{key}": value.clone() for name, part in parts.items() for key, value in part.state_dict().items()}


def test_trainer_learns_mixed_data(tmp_path, tiny_processor, one_thread):
    config = UniF2aceConfig.tiny(output_router_logits=True)
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config)
    trainable_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen_before = frozen_state(model)
    trainer = trainer_for(model, tiny_processor, tmp_path, training_records(), max_steps=30,
                          per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=0)
    assert isinstance(trainer.data_collator, StepSeededCollator)
    assert isinstance(trainer.data_collator.collator, UniF2aceDataCollator)
    assert trainer.args.remove_unused_columns is False
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 30
    for entry in logs:
        assert {"text_loss", "mask_loss", "score_loss", "aux_loss"} <= entry.keys()
        assert all(math.isfinite(entry[key]) for key in ("loss", "text_loss", "mask_loss", "score_loss", "aux_loss"))

    def mean(key, entries):
        return sum(entry[key] for entry in entries) / len(entries)

    assert mean("loss", logs[-3:]) < 0.6 * mean("loss", logs[:3])
    assert mean("text_loss", logs[-3:]) < 0.5 * mean("text_loss", logs[:3])
    assert mean("mask_loss", logs[-5:]) < mean("mask_loss", logs[:5])

    changed = [name for name, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), trainable_before[name])]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
    assert any(".mlp.experts." in name for name in changed) and any("resampler" in name for name in changed)
    for key, value in frozen_state(model).items():
        assert torch.equal(value, frozen_before[key]), key


class RecordingTrainer(UniF2aceTrainer):
    """Keeps every training micro-batch it computes a loss on."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.micro_batches.append(inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_logged_terms_with_gradient_accumulation(tmp_path, tiny_processor, one_thread):
    """Each log averages its micro-batches: the Trainer's `loss` equals the logged terms combined as the model does (a
    loss not divided by the accumulation steps would log twice that), and `text_loss` is the mean of per-micro-batch
    CEs (not re-normalised by the accumulated batch's token count). lr = 0 keeps the weights for the re-check."""
    config = UniF2aceConfig.tiny(output_router_logits=True)
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config)
    records = [training_records()[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # in order: micro-batches of 2 T2I + 2 MMU
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, max_steps=2, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=0.0, train_sampling_strategy="sequential")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=records, processing_class=tiny_processor)
    trainer.micro_batches = []
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and len(trainer.micro_batches) == 4
    for entry, batches in zip(logs, (trainer.micro_batches[:2], trainer.micro_batches[2:])):
        combined = (entry["text_loss"] + entry["mask_loss"] + config.d3diff_alpha * entry["score_loss"]
                    + config.router_aux_loss_coef * entry["aux_loss"])
        assert entry["loss"] == pytest.approx(combined, rel=1e-5)
        text_losses = []
        for batch in batches:
            assert int(batch["image_generation_mask"].any(-1).sum()) == 2
            assert int((batch["labels"] >= 0).any(-1).sum()) == 2
            with torch.no_grad():
                logits = model(**batch).logits
            text_losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).item())
        assert text_losses[0] != pytest.approx(text_losses[1])
        assert entry["text_loss"] == pytest.approx(sum(text_losses) / 2, rel=1e-5)


def test_trainer_evaluates_every_batch_kind(tmp_path, tiny_config, tiny_processor, tiny_model, one_thread):
    records = training_records()
    trainer = trainer_for(tiny_model, tiny_processor, tmp_path, records, per_device_eval_batch_size=8)
    metrics = trainer.evaluate(eval_dataset=records)
    alpha = tiny_config.d3diff_alpha
    combined = metrics["eval_text_loss"] + metrics["eval_mask_loss"] + alpha * metrics["eval_score_loss"]
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] == pytest.approx(combined, rel=1e-5)
    # generation-only batches have no labels, yet still give an evaluation loss (D3Diff only)
    t2i_only = trainer.evaluate(eval_dataset=records[:4], metric_key_prefix="t2i")
    assert math.isfinite(t2i_only["t2i_loss"]) and "t2i_text_loss" not in t2i_only
    assert t2i_only["t2i_loss"] == pytest.approx(
        t2i_only["t2i_mask_loss"] + tiny_config.d3diff_alpha * t2i_only["t2i_score_loss"], rel=1e-5
    )
    # predictions: logits (B, T, V) and the answer labels
    prediction = trainer.predict(records[4:])
    assert prediction.predictions.shape[-1] == tiny_config.vocab_size
    assert (prediction.label_ids != -100).any()


# ------------------------------------------------------------------------------------------------ length grouping
def test_record_lengths_count_text_and_image_tokens(tiny_config, tiny_processor):
    collator = UniF2aceDataCollator.from_config(tiny_processor, tiny_config)
    records = mixed_records()
    lengths = collator.record_lengths(records)

    def tokens(text: str) -> int:
        return len(tiny_processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    image = tiny_config.num_image_tokens
    assert lengths[0] == tokens("a smiling woman with long red curly hair") + image
    assert lengths[2] == tokens("a man") + image
    assert lengths[3] > lengths[1] > lengths[2]  # two turns and a system line > one short turn > a short caption
    collated = collator(records)["attention_mask"].sum(-1).tolist()
    assert sorted(range(4), key=lengths.__getitem__) == sorted(range(4), key=collated.__getitem__)


def test_group_by_length_keeps_captions_and_long_conversations_apart(tmp_path, tiny_config, tiny_processor):
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(tiny_config)
    chat = [{"from": "human", "value": "<image>\nwhat colour is the hair? is the person smiling? any glasses?"},
            {"from": "gpt", "value": "brown curly hair, yes, round glasses"}]
    records = [{"image": face(COLOURS[i % 6]), "caption": "a man"} for i in range(96)]
    records += [{"image": face(COLOURS[i % 6]), "conversations": chat} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                             train_sampling_strategy="group_by_length", seed=0)
    trainer = UniF2aceTrainer(model=model, args=args, train_dataset=records, processing_class=tiny_processor)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(128))  # every record once
    # one mega-batch (50 batches of 4 > 128 records) sorted by length: at most one batch mixes the two kinds
    mixed = [batch for batch in (order[i:i + 4] for i in range(0, 128, 4)) if 0 < sum(i >= 96 for i in batch) < 4]
    assert len(mixed) <= 1


def test_mix_tasks_per_step_needs_length_grouping(tmp_path, tiny_config, tiny_processor):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="needs train_sampling_strategy='group_by_length'"):
        UniF2aceTrainer(model=UniF2aceForConditionalGeneration(tiny_config), args=args, train_dataset=mixed_records(),
                        processing_class=tiny_processor, mix_tasks_per_step=True)


def test_length_grouped_batches_come_in_random_order():
    lengths = [290] * 2400 + [450] * 800 + [300] * 5  # captions, long conversations; 3205: one partial batch
    order = list(ShuffledLengthGroupedSampler(16, lengths, seed=0))
    assert sorted(order) == list(range(3205))
    batches = [order[i:i + 16] for i in range(0, 3205, 16)]
    assert len(batches[-1]) == 5  # only the last batch is partial: the Trainer's slices stay aligned
    kinds = [sum(lengths[i] == 450 for i in batch) / len(batch) for batch in batches]
    assert sum(0 < share < 1 for share in kinds) <= 4 + 1  # one mixed batch per mega-batch of 800, + the partial
    # transformers' LengthGroupedSampler keeps each mega-batch sorted: runs of ~12 long batches; shuffled, far fewer
    run = longest = 0
    for share in kinds:
        run = run + 1 if share == 1 else 0
        longest = max(longest, run)
    assert longest <= 6
    torch.manual_seed(0)
    reference = list(LengthGroupedSampler(16, lengths=lengths))
    reference_kinds = [all(lengths[i] == 450 for i in reference[j:j + 16]) for j in range(0, 3200, 16)]
    assert max(sum(reference_kinds[k:k + 12]) for k in range(len(reference_kinds) - 12)) >= 11


def test_kinds_get_batches_of_their_own_spread_evenly():
    """With kinds, consecutive micro-batches (one accumulated step) hold different tasks, in proportion."""
    kinds = ["t2i", "mmu"] * 40 + ["t2i"] * 3  # 43 captions: 5 full batches of 8 and 3 left over; 40 conversations
    lengths = [290 if kind == "t2i" else 400 + i % 50 for i, kind in enumerate(kinds)]
    order = list(ShuffledLengthGroupedSampler(8, lengths, seed=0, kinds=kinds))
    assert sorted(order) == list(range(83))
    batches = [{kinds[i] for i in order[j:j + 8]} for j in range(0, 80, 8)]
    assert batches == [{"mmu"}, {"t2i"}] * 5  # equal numbers alternate, in sorted label order; the rest comes last
    kinds = ["t2i"] * 48 + ["mmu"] * 16  # 6 caption batches, 2 conversation batches: spread, not bunched
    order = list(ShuffledLengthGroupedSampler(8, [10] * 64, seed=1, kinds=kinds))
    labels = "".join("m" if kinds[order[j]] == "mmu" else "t" for j in range(0, 64, 8))
    assert labels == "tmtttmtt"
    with pytest.raises(ValueError, match="2 labels for 3 records"):
        ShuffledLengthGroupedSampler(8, [1, 2, 3], kinds=["t2i", "mmu"])


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    """What an exact resume in a later epoch needs: the Trainer sets the epoch, the global RNG plays no part."""
    sampler = ShuffledLengthGroupedSampler(4, [10, 30] * 20, seed=3)
    sampler.set_epoch(2)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first
    assert list(ShuffledLengthGroupedSampler(4, [10, 30] * 20, seed=3)) != first  # epoch 0
    sampler.set_epoch(3)
    assert list(sampler) != first
