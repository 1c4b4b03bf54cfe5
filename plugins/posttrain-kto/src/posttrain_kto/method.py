"""The KTO method object: reference model, data preparation and the loss wiring for the shared loop."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import LossOutput, Metric, RowProblem, TrainContext
from posttrain.models import (
    disable_dropout,
    is_peft_model,
    pack_batch,
    reference_forward,
    reference_model,
    resolve_padding_free,
)
from posttrain.ops import sequence_logps

from posttrain_kto.config import KTOConfig
from posttrain_kto.data import FORMATS, collate_rows, fix_kl_partners, prepare_rows, row_problems
from posttrain_kto.loss import LOSSES, kl_reference_point


class KTO:
    """Kahneman-Tversky Optimization on unpaired (or auto-unpaired) preference data.

    Example::

        posttrain train kto --model ./my-sft-model --dataset prefs.jsonl --output_dir out \\
            --beta 0.1 --desirable_weight 1.0 --undesirable_weight 1.0
    """

    name = "kto"
    config_class = KTOConfig
    dataset_formats = FORMATS
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: each forward runs its rows as one (1, N) row

    def __init__(self) -> None:
        self.ref = None
        self._prepared_once = False
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    def setup(self, ctx: TrainContext[KTOConfig]) -> None:
        self.padding_free = resolve_padding_free(ctx.model, ctx.config.padding_free)
        if ctx.config.disable_dropout:
            disable_dropout(ctx.model)
        # precomputed reference log-probs come from the initial policy in precompute(): no second model kept
        self.ref = None if ctx.config.precompute_ref_log_probs else reference_model(ctx)

    def prepare(self, dataset: Any, ctx: TrainContext[KTOConfig]) -> list[dict]:
        # the class-balance advice concerns the training data, which the loop prepares first
        rows = prepare_rows(dataset, ctx.tokenizer, ctx.config, warn_balance=not self._prepared_once)
        self._prepared_once = True
        return rows

    def precompute(self, rows: list[dict], ctx: TrainContext[KTOConfig]) -> None:
        """With ``precompute_ref_log_probs``, score every row with the initial policy; the loop calls this after the
        prepared-data cache, so scores of one run's model are never reused by another."""
        if ctx.config.precompute_ref_log_probs and rows:
            self._precompute(rows, ctx)

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row, for ``posttrain check-data kto FILE``; ``prepare`` refuses exactly these rows."""
        return row_problems(rows)

    def collate(self, rows: list[dict], ctx: TrainContext[KTOConfig]) -> dict:
        return collate_rows(
            rows, ctx.tokenizer.pad_token_id, ctx.config.max_length, with_kl=ctx.config.loss_type == "kto"
        )

    @torch.no_grad()
    def _precompute(self, rows: list[dict], ctx: TrainContext[KTOConfig]) -> None:
        """Score every row (and its fixed mismatched pair) with the initial policy, which is the reference."""
        config, model = ctx.config, ctx.model
        with_kl = config.loss_type == "kto"
        if with_kl:
            fix_kl_partners(rows)
        size = config.precompute_ref_batch_size or config.per_device_eval_batch_size
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                batch = {k: v.to(ctx.device) for k, v in self.collate(chunk, ctx).items()}
                ref_logps, ref_kl_logps = self._reference_logps(model, batch, with_kl, self._free(config))
                order = sorted(chunk, key=lambda r: r["index"])  # collate's order
                for i, row in enumerate(order):
                    row["ref_logps"] = float(ref_logps[i])
                    if with_kl:
                        row["ref_kl_logps"] = float(ref_kl_logps[i])
        finally:
            model.train(was_training)

    def _free(self, config: KTOConfig) -> bool | str:
        """Padding-free forwards (for :func:`posttrain.models.pack_batch`, which decides each forward's layout):
        true is honoured without setup (which checks the model); auto needs setup."""
        return config.padding_free is True or self.padding_free

    def _reference_logps(
        self, policy: Any, batch: dict, with_kl: bool, free: bool | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ref = self.ref
        if ref is None and not is_peft_model(getattr(policy, "module", policy)):
            ref = policy  # precompute: the policy has not been updated yet
        with reference_forward(policy, ref) as model:
            ref_logps = sequence_logps(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                padding_free=pack_batch(model, free, batch["attention_mask"]),
            )[0]
            ref_kl_logps = None
            if with_kl:
                ref_kl_logps = sequence_logps(
                    model,
                    batch["kl_input_ids"],
                    batch["kl_attention_mask"],
                    batch["kl_completion_mask"],
                    padding_free=pack_batch(model, free, batch["kl_attention_mask"]),
                )[0]
        return ref_logps, ref_kl_logps

    def loss(self, model: Any, batch: dict, ctx: TrainContext[KTOConfig]) -> LossOutput:
        config = ctx.config
        with_kl = config.loss_type == "kto"
        labels = batch["labels"]  # (B,)
        free = self._free(config)  # padding-free forwards give the padded batch's values, to rounding
        logps = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            padding_free=pack_batch(model, free, batch["attention_mask"]),
        )[0]
        if "ref_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_kl_logps")
        else:
            ref_logps, ref_kl_logps = self._reference_logps(model, batch, with_kl, free)

        metrics: dict[str, Any] = {}
        kl = None
        if with_kl:
            with torch.no_grad():  # z0 is detached: the mismatched pairs need no graph
                kl_logps = sequence_logps(
                    model,
                    batch["kl_input_ids"],
                    batch["kl_attention_mask"],
                    batch["kl_completion_mask"],
                    padding_free=pack_batch(model, free, batch["kl_attention_mask"]),
                )[0]
            kl = kl_reference_point(kl_logps, ref_kl_logps)
            if ctx.num_processes > 1:  # one z0 for the step's micro-batch on every process, as TRL gathers it
                raw = ctx.accelerator.reduce((kl_logps - ref_kl_logps).mean(), reduction="mean")
                kl = raw.clamp(min=0).detach()
            metrics["kl"] = kl
        losses, rewards = LOSSES[config.loss_type](
            logps=logps,
            ref_logps=ref_logps,
            labels=labels,
            kl=kl,
            beta=config.beta,
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
        )

        # per-kind means as sums with counts (TRL's KTO logs sum / count over the logging window the same way)
        chosen, rejected, scored = labels, ~labels, logps.detach()
        if chosen.any():
            metrics["rewards/chosen"] = Metric.ratio(rewards[chosen].sum(), chosen.sum())
            metrics["logps/chosen"] = Metric.ratio(scored[chosen].sum(), chosen.sum())
        if rejected.any():
            metrics["rewards/rejected"] = Metric.ratio(rewards[rejected].sum(), rejected.sum())
            metrics["logps/rejected"] = Metric.ratio(scored[rejected].sum(), rejected.sum())
        if chosen.any() and rejected.any():  # this micro-batch's difference of means, averaged over micro-batches
            metrics["rewards/margins"] = rewards[chosen].mean() - rewards[rejected].mean()
        return LossOutput(loss_sum=losses.sum(), n_items=labels.numel(), metrics=metrics)
