"""The BCO method object: wires data, reference model, running reward shift and loss into the posttrain loop."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import LossOutput, Metric, RowProblem, TrainContext
from posttrain.models import disable_dropout, pack_batch, reference_forward, reference_model, resolve_padding_free
from posttrain.ops import sequence_logps

from posttrain_bco.config import BCOConfig
from posttrain_bco.data import FORMATS, collate_rows, prepare_rows, row_problems
from posttrain_bco.loss import bco_loss, implicit_rewards, update_running_mean


def completion_logps(model: Any, batch: dict, padding_free: bool = False) -> torch.Tensor:
    """(B,) summed log-probs of the completion tokens of each row."""
    # the head runs in chunks on completion tokens only: no (B, T, V) logits
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    return sequence_logps(model, ids, mask, completion, padding_free=padding_free)[0]  # (B,)


class BCO:
    """Binary Classifier Optimization (arXiv 2404.04656) on unpaired or paired preference data.

    Example::

        posttrain train bco --model ./tiny --dataset feedback.jsonl --output_dir out

    State: the running mean ``delta`` of the implicit rewards and how many rewards it averages. It is saved in
    every checkpoint (``state_dict``), so a resumed run continues with exactly the same shift.
    """

    name = "bco"
    config_class = BCOConfig
    dataset_formats = FORMATS
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: each forward runs its rows as one (1, N) row

    def __init__(self) -> None:
        self.ref_model = None
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup
        self.delta = 0.0  # running mean of the implicit rewards (the reward shift)
        self.delta_count = 0.0  # how many rewards it averages

    def setup(self, ctx: TrainContext[BCOConfig]) -> None:
        self.padding_free = resolve_padding_free(ctx.model, ctx.config.padding_free)
        if ctx.config.disable_dropout:
            disable_dropout(ctx.model)
        self.ref_model = reference_model(ctx)  # None under LoRA: the adapter-disabled policy is the reference

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row, for ``posttrain check-data bco FILE``; ``prepare`` refuses exactly these rows."""
        return row_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[BCOConfig]) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config.max_length)

    def collate(self, rows: list[dict], ctx: TrainContext[BCOConfig]) -> dict:
        return collate_rows(rows, ctx.tokenizer.pad_token_id)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "delta_count": self.delta_count}

    def load_state_dict(self, state: dict) -> None:
        self.delta, self.delta_count = float(state["delta"]), float(state["delta_count"])

    def loss(self, model: Any, batch: dict, ctx: TrainContext[BCOConfig]) -> LossOutput:
        labels = batch["labels"]  # (B,) bool
        # true works without setup; auto needs it, and packs this micro-batch where that is estimated cheaper
        free = pack_batch(model, ctx.config.padding_free is True or self.padding_free, batch["attention_mask"])
        logps = completion_logps(model, batch, free)  # (B,)
        with reference_forward(model, self.ref_model) as ref:
            ref_logps = completion_logps(ref, batch, free)  # (B,)
        rewards = implicit_rewards(logps, ref_logps, ctx.config.beta)  # (B,)

        # [sum r, n, sum r over desirable rows, their number], summed over processes in training so that every
        # process updates delta identically
        r, lp, is_c = rewards.detach().double(), logps.detach().double(), labels.double()
        stats = torch.stack([r.sum(), is_c.new_tensor(len(r)), (r * is_c).sum(), is_c.sum()])
        if ctx.training and ctx.num_processes > 1:
            stats = ctx.accelerator.reduce(stats, reduction="sum")
        r_sum, n, r_c, n_c = stats.tolist()
        if ctx.training:  # one update per micro-batch, before its loss, as TRL's BCO trainer did
            self.delta, self.delta_count = update_running_mean(self.delta, self.delta_count, r_sum, n)

        losses = bco_loss(rewards, labels, self.delta)  # (B,)
        # delta: the shift after the logging window's last update
        metrics: dict[str, Any] = {"delta": Metric.last(self.delta)}
        # per-kind means as this process's sums with their counts, pooled by the loop over the logging window and the
        # processes (TRL's BCO logs sum / count the same way); a kind absent from the micro-batch is not reported
        for kind, mask in (("chosen", is_c), ("rejected", 1 - is_c)):
            if mask.sum() > 0:
                metrics[f"rewards/{kind}"] = Metric.ratio((r * mask).sum(), mask.sum())
                metrics[f"logps/{kind}"] = Metric.ratio((lp * mask).sum(), mask.sum())
        if 0 < n_c < n:  # this micro-batch's difference of the two means (all processes in training)
            metrics["rewards/margins"] = r_c / n_c - (r_sum - r_c) / (n - n_c)
        return LossOutput(loss_sum=losses.sum(), n_items=len(labels), metrics=metrics)
