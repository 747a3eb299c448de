"""`UniF2aceTrainer`: `transformers.Trainer` for mixed MMU + T2I batches (SPEC §4: text CE + D3Diff + balance loss).

The model computes the whole loss itself (`outputs.loss`); the trainer adds what a plain `Trainer` lacks:
- the separate terms `text_loss`, `mask_loss`, `score_loss`, `aux_loss` in the training logs (each the mean over the
  micro-batches since the previous log that had the term, summed over processes) and in the evaluation metrics
  (`eval_text_loss`, ...);
- raw records reach the collator (`remove_unused_columns` is turned off: the columns are `image`, `caption`,
  `messages`, ..., none of which is a `forward` argument);
- a [`UniF2aceDataCollator`] built from `processing_class` and the model config when no `data_collator` is given;
- an evaluation loss for every batch, including T2I-only batches that carry no `labels`.

Gradient accumulation: every term is a mean over its micro-batch, so `compute_loss` returns a per-micro-batch mean
and the Trainer divides it by the number of accumulation steps (`loss_is_scaled_for_ga = False`); the text loss is
not re-normalised by the token count of the whole accumulated batch (`num_items_in_batch` is not passed), which would
mix two normalisations in one sum.
"""

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_detach
from transformers.trainer_utils import EvalLoopOutput, has_length
from transformers.utils import logging

from ..processing_unif2ace import UniF2aceProcessor
from .collator import StepSeededCollator, UniF2aceDataCollator
from .sampler import ShuffledLengthGroupedSampler


logger = logging.get_logger(__name__)

LOSS_TERMS = ("text_loss", "mask_loss", "score_loss", "aux_loss", "z_loss")


class UniF2aceTrainer(Trainer):
    r"""
    [`~transformers.Trainer`] for [`UniF2aceForConditionalGeneration`] on mixed understanding + generation data.

    Takes the same arguments as `Trainer`, plus `balance_loss` (`bool`, *optional*): ask the model for its router
    logits so that the MoE balance loss joins the loss (default: `config.output_router_logits`); and
    `mix_tasks_per_step` (`bool`, default False): with `train_sampling_strategy="group_by_length"`, every micro-batch
    holds one task's records of similar length and the tasks' micro-batches alternate (in proportion to their numbers),
    so that with `gradient_accumulation_steps=2` and as many T2I as MMU records every optimizer step sees both tasks
    (SPEC §4) without padding captions to the length of conversations; without it a step's records are grouped by
    length alone, so a step is mostly one task.

    With `data_collator=None` and a [`UniF2aceProcessor`] as `processing_class`, the collator is
    `UniF2aceDataCollator.from_config(processing_class, model.config)`. A `UniF2aceDataCollator` is wrapped in a
    [`StepSeededCollator`] (seed `args.data_seed or args.seed`) and kept in step by a [`StepSeedCallback`], so that
    the masks of every micro-batch depend only on its position in the run: resuming from a checkpoint continues with
    exactly the masks (and losses) of an uninterrupted run, and N processes draw what N accumulation steps would.
    `args.remove_unused_columns` is set to False (the collator needs the raw record columns).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, balance_loss: bool | None = None, mix_tasks_per_step: bool = False, **kwargs):
        if data_collator is None and isinstance(processing_class, UniF2aceProcessor) and model is not None:
            data_collator = UniF2aceDataCollator.from_config(processing_class, model.config)
        if isinstance(data_collator, UniF2aceDataCollator):
            seed = 42 if args is None else (args.data_seed if args.data_seed is not None else args.seed)
            data_collator = StepSeededCollator(data_collator, seed=seed)
        if isinstance(data_collator, StepSeededCollator):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StepSeedCallback(data_collator)]
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if mix_tasks_per_step and self.args.train_sampling_strategy != "group_by_length":
            raise ValueError("mix_tasks_per_step=True groups each task's records by length: it needs "
                             f"train_sampling_strategy='group_by_length', got {self.args.train_sampling_strategy!r}")
        self.balance_loss = balance_loss
        self.mix_tasks_per_step = mix_tasks_per_step
        if self.args.remove_unused_columns:
            logger.info("UniF2aceTrainer sets remove_unused_columns=False: the collator reads the raw record columns")
            self.args.remove_unused_columns = False
        self.model_accepts_loss_kwargs = False  # num_items_in_batch is neither counted nor passed (module docstring)
        self._loss_terms = {split: self._empty_terms() for split in ("train", "eval")}

    def _get_train_sampler(self, train_dataset=None):
        """With `train_sampling_strategy="group_by_length"` and no precomputed length column, a
        [`ShuffledLengthGroupedSampler`] over the collator's `record_lengths` (the Trainer's own sampler would look
        for `input_ids` in the raw records, and keeps runs of same-kind batches: see `sampler.py`)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        collator = getattr(self.data_collator, "collator", self.data_collator)
        has_length_column = self.args.length_column_name in (getattr(dataset, "column_names", None) or ())
        if (self.args.train_sampling_strategy != "group_by_length" or has_length_column
                or not isinstance(collator, UniF2aceDataCollator) or not has_length(dataset)):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.mix_tasks_per_step:
            return ShuffledLengthGroupedSampler(self.args.train_batch_size, collator.record_lengths(dataset), seed=seed,
                                                kinds=collator.record_kinds(dataset))
        return ShuffledLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            collator.record_lengths(dataset), seed=seed)

    def _empty_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts), one slot per name of LOSS_TERMS, on the training device."""
        device = self.args.device
        return torch.zeros(len(LOSS_TERMS), device=device), torch.zeros(len(LOSS_TERMS), device=device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """`outputs.loss` of the model (text CE + D3Diff + λ · balance), a mean over this micro-batch
        (`num_items_in_batch` is ignored, see the module docstring); records the separate terms for logging. Unless
        the outputs are asked for, the model builds no full logits (`skip_logits`): the losses need only the labelled
        and masked positions."""
        if self.balance_loss is not None:
            inputs = {**inputs, "output_router_logits": self.balance_loss}
        outputs = model(**inputs, skip_logits=not return_outputs)
        if outputs.loss is None:
            raise ValueError(
                "The model returned no loss: a batch needs `labels` (MMU rows) or `image_generation_mask` (T2I rows); "
                "build batches with UniF2aceDataCollator"
            )
        sums, counts = self._loss_terms["train" if model.training else "eval"]
        for slot, name in enumerate(LOSS_TERMS):
            value = getattr(outputs, name, None)
            if value is not None:
                sums[slot] += value.detach().float().mean().to(sums.device)
                counts[slot] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _pop_loss_terms(self, split: str, prefix: str) -> dict[str, float]:
        """Means of the recorded terms over micro-batches (and processes) since the last call; resets them."""
        sums, counts = self._loss_terms[split]
        self._loss_terms[split] = self._empty_terms()
        totals = self.accelerator.reduce(torch.cat([sums, counts]), reduction="sum").tolist()
        sums, counts = totals[: len(LOSS_TERMS)], totals[len(LOSS_TERMS):]
        return {f"{prefix}{name}": total / count for name, total, count in zip(LOSS_TERMS, sums, counts) if count > 0}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs (those with `loss`) also get the mean `text_loss`, `mask_loss`, `score_loss`, `aux_loss`."""
        if "loss" in logs:
            logs = {**logs, **self._pop_loss_terms("train", prefix="")}
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The Trainer's loop, plus `{metric_key_prefix}_text_loss`, ... in the metrics."""
        self._loss_terms["eval"] = self._empty_terms()
        with getattr(self.data_collator, "evaluating", nullcontext)():
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        output.metrics.update(self._pop_loss_terms("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, logits, labels) of one batch; the loss exists for every batch (T2I-only batches have no labels and
        no logits: the model skips the full LM head there)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        logits = None if outputs.logits is None else nested_detach(outputs.logits)
        return loss, logits, inputs.get("labels")


class StepSeedCallback(TrainerCallback):
    """At each epoch start, tells the [`StepSeededCollator`] how many micro-batches this process consumed before (the
    Trainer's own resume arithmetic: whole epochs plus the optimizer steps of the current one × accumulation)."""

    def __init__(self, collator: StepSeededCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        accumulation = args.gradient_accumulation_steps
        try:
            batches = len(train_dataloader)
        except TypeError:  # an iterable dataset: one endless pass (the Trainer counts max_steps updates per "epoch")
            batches = None
        if batches is None:
            consumed = state.global_step * accumulation
        else:
            epochs, updates = divmod(state.global_step, max(math.ceil(batches / accumulation), 1))
            consumed = epochs * batches + (0 if args.ignore_data_skip else updates * accumulation)
        self.collator.reset(consumed, args.process_index, args.world_size)


__all__ = ["UniF2aceTrainer", "StepSeedCallback"]
