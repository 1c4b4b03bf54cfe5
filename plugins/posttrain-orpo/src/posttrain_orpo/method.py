"""The ORPO method object: wires data preparation, the concatenated forward pass and the loss into the loop."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from posttrain import LossOutput, Metric, RowProblem, TrainContext
from posttrain.models import disable_dropout, pack_batch, resolve_padding_free
from posttrain.ops import token_stats

from posttrain_orpo.config import ORPOConfig
from posttrain_orpo.data import FORMATS, collate_pairs, prepare_rows, row_problems
from posttrain_orpo.loss import orpo_loss


def concatenated_forward(
    model: Any, batch: dict[str, torch.Tensor], padding_free: bool = False
) -> dict[str, torch.Tensor]:
    """One forward pass over the ``[chosen ; rejected]`` batch; per-token log-probs and their masks.

    ``padding_free`` runs the batch as one (1, N) row without padding (:func:`posttrain.ops.token_stats`); the
    results come back in the padded layout.

    Returns a dict of (2B, T-1) tensors aligned with the predicted tokens: ``logps`` (0 at padding),
    ``token_mask`` (every real token after the first), ``completion_mask`` (completion tokens), and
    ``mean_logits`` (2B,), the vocabulary-mean logit averaged over completion tokens (a metric).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (2B, T-1)
    # the head runs in chunks on real tokens only: no (2B, T, V) logits (posttrain.ops.token_stats)
    out = token_stats(
        model,
        F.pad(labels, (0, 1), value=-100),
        mean_logit=True,
        padding_free=padding_free,
        input_ids=input_ids,
        attention_mask=attention_mask,
    )
    logps = out.logps[:, :-1]  # (2B, T-1), float32, 0 at padding
    token_mask = attention_mask[:, 1:].to(logps.dtype)
    completion_mask = batch["completion_mask"][:, 1:].to(logps.dtype)
    vocab_mean = out.mean_logit[:, :-1]  # (2B, T-1), detached
    mean_logits = (vocab_mean * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1)
    return {"logps": logps, "token_mask": token_mask, "completion_mask": completion_mask, "mean_logits": mean_logits}


# Copied from posttrain_dpo.method._per_pair
def _per_pair(values: torch.Tensor) -> Metric:
    """The mean over pairs, logged as sum / count so it stays exact over micro-batches and processes."""
    return Metric.ratio(values.sum(), values.numel())


class ORPO:
    """Odds Ratio Preference Optimization (arXiv 2403.07691): SFT plus an odds-ratio penalty, no reference model.

    Example::

        from posttrain.loop import train
        from posttrain_orpo import ORPO, ORPOConfig

        config = ORPOConfig(model="path/to/model", dataset="prefs.jsonl", output_dir="out", beta=0.1)
        train(ORPO(), config)
    """

    name = "orpo"
    config_class = ORPOConfig
    dataset_formats = FORMATS
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: each forward runs its rows as one (1, N) row
    padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    def setup(self, ctx: TrainContext[ORPOConfig]) -> None:
        self.padding_free = resolve_padding_free(ctx.model, ctx.config.padding_free)
        if ctx.config.disable_dropout:
            disable_dropout(ctx.model)

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row, for ``posttrain check-data orpo FILE``; ``prepare`` refuses exactly these rows (and rows
        whose prompt gives no token under a tokenizer without BOS, which needs the tokenizer to see)."""
        return row_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[ORPOConfig]) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config.max_length, ctx.config.max_prompt_length)

    def collate(self, rows: list[dict], ctx: TrainContext[ORPOConfig]) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, ctx.tokenizer.pad_token_id)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], ctx: TrainContext[ORPOConfig]) -> LossOutput:
        """Sum of per-pair ORPO losses over the micro-batch, normalised by the number of pairs."""
        config = ctx.config
        # one (1, N) row without padding when padding_free is on (true works without setup; auto needs it, and
        # packs this micro-batch where that is estimated cheaper)
        free = pack_batch(model, ctx.config.padding_free is True or self.padding_free, batch["attention_mask"])
        out = concatenated_forward(model, batch, free)
        n_pairs = batch["input_ids"].shape[0] // 2
        logps, completion_mask = out["logps"], out["completion_mask"]
        # ORPO's P(y|x) is the per-token average likelihood, so the odds compare mean log-probs
        mean_logps = (logps * completion_mask).sum(-1) / completion_mask.sum(-1)  # (2B,)
        chosen_logps, rejected_logps = mean_logps[:n_pairs], mean_logps[n_pairs:]
        nll_mask = (out["token_mask"] if config.nll_on_prompt else completion_mask)[:n_pairs]  # (B, T-1)
        chosen_nll = -(logps[:n_pairs] * nll_mask).sum(-1) / nll_mask.sum(-1)  # (B,)
        losses, log_odds = orpo_loss(chosen_nll, chosen_logps, rejected_logps, config.beta)

        chosen_rewards, rejected_rewards = config.beta * chosen_logps.detach(), config.beta * rejected_logps.detach()
        metrics = {
            "rewards/chosen": _per_pair(chosen_rewards),
            "rewards/rejected": _per_pair(rejected_rewards),
            "rewards/accuracies": _per_pair((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": _per_pair(chosen_rewards - rejected_rewards),
            "logps/chosen": _per_pair(chosen_logps.detach()),
            "logps/rejected": _per_pair(rejected_logps.detach()),
            "logits/chosen": _per_pair(out["mean_logits"][:n_pairs]),
            "logits/rejected": _per_pair(out["mean_logits"][n_pairs:]),
            "nll_loss": _per_pair(chosen_nll.detach()),
            "log_odds_ratio": _per_pair(torch.nn.functional.logsigmoid(log_odds.detach())),
            "log_odds_chosen": _per_pair(log_odds.detach()),
        }
        return LossOutput(loss_sum=losses.sum(), n_items=n_pairs, metrics=metrics)
