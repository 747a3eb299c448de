#!/usr/bin/env python
"""Supervised finetuning of UniF²ace's face understanding with TRL's `SFTTrainer` on chat data with images
(`{"images": [face], "messages": [...]}`, TRL's vision-language format), the `UniF2aceProcessor` as
`processing_class`.

    python examples/sft_understanding.py --tiny --max_steps 2 --output_dir runs/sft                 # seconds, CPU
    python examples/sft_understanding.py --model path/to/unif2ace --lora --max_steps 1000 --output_dir runs/sft
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/sft_understanding.py --tiny ...

How it fits TRL 1.16:
- TRL's vision collator renders the chat template and tokenizes through the processor; the labels are the assistant
  answers only (`assistant_only_loss`, from the template's `{% generation %}` spans: the processor reports its
  `<|mmu|>` / image expansion offsets so the masks land on the right tokens). The image span
  (`<|soi|> [MASK]×N <|eoi|>`, which the model fills with VQ codes) is always removed from the labels
  ([`FaceChatCollator`]), also with `--assistant_only_loss False` (then every other token is learned).
- `max_length=None`: truncation would cut image spans.
- TRL patches the model's `forward` with a fused LM head that shifts the labels itself and calls the backbone
  (`UniF2aceModel`) without them, so nothing is shifted twice; its loss equals the model's own `text_loss`.
- TRL's MoE auxiliary loss assumes one flat router per layer; UniF²ace's grouped routers keep theirs: with
  `--balance_loss` (default) [`UniF2aceSFTTrainer`] records the token routers' logits during TRL's forward and adds
  `router_aux_loss_coef · aux_loss`. The logs show `loss`, `text_loss` and `aux_loss`.
"""

import sys
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from train_unified import (ModelArguments, load_model_and_processor, parse_args, run, save_result,
                           toy_face_records)
from transformers_f2ace.modeling_unif2ace import T2I_TASK, load_balancing_loss


# TRL's SFTConfig turns checkpointing and bf16 on by default (GPU habits); here they are opt-in
SFT_DEFAULTS = dict(max_length=None, assistant_only_loss=True, gradient_checkpointing=None,
                    activation_checkpointing=False, bf16=False)


def chat_dataset(num_examples: int, seed: int) -> Dataset:
    """Toy faces with one question and its answer each, in TRL's vision format: `{"images": [face], "messages"}`."""
    return Dataset.from_list([{"images": [record["image"]], "messages": record["messages"]}
                              for record in toy_face_records(num_examples, t2i_fraction=0.0, seed=seed)])


class FaceChatCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision-language collator, with the image spans (`<|soi|>` … `<|eoi|>`, placeholders included) removed
    from the labels: the model replaces the placeholders by VQ codes, which are inputs, not text to learn."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        token_id = self.processor.tokenizer.convert_tokens_to_ids
        ids = batch["input_ids"]
        opened = (ids == token_id("<|soi|>")).cumsum(-1)
        closed = (ids == token_id("<|eoi|>")).cumsum(-1)
        in_image = (opened > closed) | (ids == token_id("<|eoi|>"))
        batch["labels"] = batch["labels"].masked_fill(in_image, -100)
        return batch


class RouterLogitsRecorder:
    """Forward hooks on the token-level routers: their logits (N_tok, G·E) while `recording` is on."""

    def __init__(self, model: torch.nn.Module):
        self.recording = False
        self.logits: list[torch.Tensor] = []
        self.handles = [module.register_forward_hook(self._record) for module in model.modules()
                        if type(module).__name__ == "UniF2aceTopKRouter"]

    def _record(self, module, args, output) -> None:
        if self.recording:
            self.logits.append(output[0])


class UniF2aceSFTTrainer(SFTTrainer):
    """`SFTTrainer` (text cross-entropy through TRL's fused LM head) plus UniF²ace's grouped MoE balance loss."""

    def __init__(self, *args, balance_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        self.balance_coef = config.router_aux_loss_coef if balance_loss and config.moe_config.token_moe else 0.0
        self.routers = RouterLogitsRecorder(self.model) if self.balance_coef else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.routers is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.routers.recording = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.routers.recording = False
        router_logits, self.routers.logits = self.routers.logits, []
        text_loss = result[0] if return_outputs else result
        aux_loss = self._balance_loss(router_logits, inputs)
        # As TRL does with its own aux loss: with `num_items_in_batch`, the text loss of a micro-batch is its share of
        # the accumulated step's token mean and the Trainer does not divide by the accumulation steps, so the
        # per-micro-batch balance loss is divided here (and the logged text loss scaled back to a step mean)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = text_loss + self.balance_coef * aux_loss / steps
        mode = "train" if self.model.training else "eval"
        for name, value in (("text_loss", text_loss * steps), ("aux_loss", aux_loss)):
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, result[1]) if return_outputs else loss

    def _balance_loss(self, router_logits: list[torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's `load_balancing_loss` over the recorded routers (task group per row from its task token)."""
        config = self.model.config
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        task_ids = (input_ids == config.t2i_token_id).any(-1).long() * T2I_TASK
        return load_balancing_loss(
            tuple(router_logits), task_ids.repeat_interleave(input_ids.shape[1]), config.moe_config.num_experts,
            config.moe_config.num_experts_per_tok, attention_mask.bool(),
        )


def build_trainer(script_args, training_args, dataset, eval_dataset=None) -> tuple[UniF2aceSFTTrainer, Any]:
    """Model (with LoRA if asked), processor, the image-span-masking collator and the trainer."""
    model, processor = load_model_and_processor(script_args, training_args)
    collator = FaceChatCollator(processor, max_length=training_args.max_length,
                                assistant_only_loss=training_args.assistant_only_loss)
    trainer = UniF2aceSFTTrainer(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
                                 processing_class=processor, data_collator=collator,
                                 balance_loss=script_args.balance_loss)
    return trainer, processor


def main(argv: Sequence[str] | None = None) -> UniF2aceSFTTrainer:
    script_args, training_args = parse_args(argv, __doc__.split("\n\n")[0], ModelArguments, training_class=SFTConfig,
                                            output_dir="runs/sft", **SFT_DEFAULTS)
    dataset = chat_dataset(script_args.num_examples, training_args.seed)
    eval_dataset = None
    if script_args.num_eval_examples:
        eval_dataset = chat_dataset(script_args.num_eval_examples, training_args.seed + 1)
    trainer, processor = build_trainer(script_args, training_args, dataset, eval_dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_result(trainer, processor, script_args)
    return trainer


if __name__ == "__main__":
    run(main, sys.argv[1:])
