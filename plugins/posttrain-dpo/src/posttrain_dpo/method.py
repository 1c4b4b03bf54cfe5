"""The DPO method object: reference handling, one forward per batch, the loss and TRL's metrics."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from posttrain import ConfigError, LossOutput, Metric, PosttrainError, RowProblem, TrainContext
from posttrain.models import (
    disable_dropout,
    is_peft_model,
    pack_batch,
    reference_forward,
    reference_model,
    resolve_padding_free,
)
from posttrain.ops import packed_sequence_logps, sequence_logps
from posttrain.vision import model_inputs

from posttrain_dpo.config import DPOConfig
from posttrain_dpo.data import collate_pairs, pair_lengths, preference_problems, tokenize_dataset
from posttrain_dpo.loss import dpo_loss


def completion_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of the whole (2B, T) batch (or its (1, N) padding-free row): chosen and rejected share it,
    padding masked out.

    Returns:
        (logps, lengths, logit_sums), each (2B,): summed completion log-probs, completion tokens scored,
        and the vocabulary-mean logit summed over those tokens (for TRL's ``logits/*`` metrics).
    """
    if "sequence_ids" in batch:  # padding-free: per-sequence sums of the one packed row
        logps, lengths, mean_logits = packed_sequence_logps(
            model,
            batch["input_ids"],
            batch["position_ids"],
            batch["sequence_ids"],
            batch["completion_mask"],
            len(batch["sequence_lengths"]),
        )
    else:
        logps, lengths, mean_logits = sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **model_inputs(batch)
        )
    return logps, lengths, mean_logits * lengths


def _per_pair(values: torch.Tensor) -> Metric:
    """The mean over pairs, logged as sum / count so it stays exact over micro-batches and processes."""
    return Metric.ratio(values.sum(), values.numel())


class DPO:
    """Direct Preference Optimization on ``prompt`` / ``chosen`` / ``rejected`` rows.

    Example::

        from posttrain.loop import train
        from posttrain_dpo import DPO, DPOConfig

        train(DPO(), DPOConfig(model="./tiny", dataset="prefs.jsonl", output_dir="out", beta=0.1))
    """

    name = "dpo"
    config_class = DPOConfig
    dataset_formats = ("preference",)
    supports_images = True  # rows with images train a vision-language model (posttrain.vision)
    supports_padding_free = True  # padding_free: one (1, N) row per micro-batch (posttrain.ops.pack_sequences)
    prepare_cacheable = True  # prepare reads rows, tokenizer, processor and config only; reference scores: precompute

    def __init__(self) -> None:
        self.ref_model = None  # None: reference-free, precomputed, or LoRA (adapter-disabled base)
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    def setup(self, ctx: TrainContext[DPOConfig]) -> None:
        """Disable dropout, resolve ``padding_free`` and, unless the run needs none, build the frozen reference."""
        config = ctx.config
        self.padding_free = resolve_padding_free(ctx.model, config.padding_free)
        if config.disable_dropout:
            disable_dropout(ctx.model)
        if not (config.reference_free or config.precompute_ref_log_probs):
            self.ref_model = reference_model(ctx)  # a frozen copy; None under LoRA
            if self.ref_model is not None and config.disable_dropout:
                disable_dropout(self.ref_model)

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row (core's preference checks, then strings and messages mixed in a row); prepare refuses them."""
        return preference_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[DPOConfig]) -> list[dict]:
        config = ctx.config
        rows = tokenize_dataset(
            dataset, ctx.tokenizer, config.max_length, config.max_prompt_length, processor=ctx.processor
        )
        if config.padding_free is True and any("images" in r for r in rows):
            raise ConfigError(
                "padding_free is true, but the dataset has images: the model matches image features to image tokens "
                "across a whole row, so sequences with images cannot share one. Set padding_free false (or auto) "
                "for vision-language data."
            )
        return rows

    def precompute(self, rows: list[dict], ctx: TrainContext[DPOConfig]) -> None:
        """With ``precompute_ref_log_probs``, score every row under the reference; the loop calls this after the
        prepared-data cache, so scores of one run's model are never reused by another."""
        if ctx.config.precompute_ref_log_probs:
            self._precompute_ref_logps(rows, ctx)

    def _precompute_ref_logps(self, rows: list[dict], ctx: TrainContext[DPOConfig]) -> None:
        """Score every row under the reference once and store it in the row (``ref_*_logps`` floats).

        ``prepare`` runs before the first optimizer step, so the policy itself is still the reference
        (TRL does the same); under LoRA the adapter is disabled for this pass.
        """
        model, config = ctx.model, ctx.config
        reference = self.ref_model if self.ref_model is not None else (None if is_peft_model(model) else model)
        batch_size = config.precompute_ref_batch_size or config.per_device_train_batch_size
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = collate_pairs(chunk, ctx.tokenizer.pad_token_id, config.max_length, ctx.processor)
                batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                autocast = ctx.accelerator.autocast() if ctx.accelerator is not None else contextlib.nullcontext()
                with reference_forward(model, reference) as ref, autocast:
                    logps = completion_logps(ref, batch)[0]
                ref_chosen, ref_rejected = logps.float().cpu().chunk(2)
                for row, chosen, rejected in zip(chunk, ref_chosen.tolist(), ref_rejected.tolist()):
                    row["ref_chosen_logps"], row["ref_rejected_logps"] = chosen, rejected
        finally:
            model.train(was_training)

    def collate(self, rows: list[dict], ctx: TrainContext[DPOConfig]) -> dict:
        # true is honoured without setup (which checks the model); auto needs setup's verdict, and packs this
        # micro-batch where that is estimated cheaper; image rows stay padded
        config = ctx.config
        free = pack_batch(
            ctx.model, config.padding_free is True or self.padding_free, pair_lengths(rows, config.max_length)
        )
        padding_free = free and not any("images" in r for r in rows)
        return collate_pairs(rows, ctx.tokenizer.pad_token_id, config.max_length, ctx.processor, padding_free)

    def loss(self, model: Any, batch: dict, ctx: TrainContext[DPOConfig]) -> LossOutput:
        config = ctx.config
        logps, lengths, logit_sums = completion_logps(model, batch)  # (2B,) each
        chosen_logps, rejected_logps = logps.chunk(2)  # batch is [chosen; rejected]
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif config.reference_free:
            ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
        else:
            if self.ref_model is None and not is_peft_model(getattr(model, "module", model)):
                raise PosttrainError(
                    "posttrain-dpo: no reference model. DPO.setup(ctx) builds it and the training loop calls it; "
                    "call setup before loss, or set reference_free or precompute_ref_log_probs."
                )
            with reference_forward(model, self.ref_model) as ref:
                ref_logps = completion_logps(ref, batch)[0]
            ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)

        per_pair = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_lengths,
            rejected_lengths,
            beta=config.beta,
            loss_type=config.loss_type,
            loss_weights=config.loss_weights,
            label_smoothing=config.label_smoothing,
            rpo_alpha=config.rpo_alpha,
        )  # (B,)

        chosen_rewards = config.beta * (chosen_logps - ref_chosen_logps).detach()  # (B,)
        rejected_rewards = config.beta * (rejected_logps - ref_rejected_logps).detach()
        chosen_logit_sums, rejected_logit_sums = logit_sums.chunk(2)
        metrics = {
            "rewards/chosen": _per_pair(chosen_rewards),
            "rewards/rejected": _per_pair(rejected_rewards),
            "rewards/accuracies": _per_pair((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": _per_pair(chosen_rewards - rejected_rewards),
            "logps/chosen": _per_pair(chosen_logps.detach()),
            "logps/rejected": _per_pair(rejected_logps.detach()),
            # token means of the vocabulary-mean logit, over every chosen (rejected) token of the logging window
            "logits/chosen": Metric.ratio(chosen_logit_sums.sum(), chosen_lengths.sum()),
            "logits/rejected": Metric.ratio(rejected_logit_sums.sum(), rejected_lengths.sum()),
        }
        return LossOutput(loss_sum=per_pair.sum(), n_items=len(per_pair), metrics=metrics)
