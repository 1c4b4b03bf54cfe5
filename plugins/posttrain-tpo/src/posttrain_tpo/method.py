"""The TPO method object: one forward over [chosen; rejected; reference], preference term + gold NLL."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from posttrain import LossOutput, Metric, RowProblem, TrainContext
from posttrain.models import disable_dropout, pack_batch, resolve_padding_free
from posttrain.ops import token_stats

from posttrain_tpo.config import TPOConfig
from posttrain_tpo.data import collate_rows, prepare_rows, row_problems
from posttrain_tpo.loss import LENGTH_NORMALISED, LOSSES, reference_nll


# Copied from posttrain_dpo.method._per_pair
def _per_pair(values: torch.Tensor) -> Metric:
    """The mean over pairs, logged as sum / count so it stays exact over micro-batches and processes."""
    return Metric.ratio(values.sum(), values.numel())


def _per_token(values: torch.Tensor, mask: torch.Tensor) -> Metric:
    """The mean of ``values`` over the tokens where ``mask`` is true, logged as sum / count (exact over the window)."""
    return Metric.ratio((values * mask).sum(), mask.sum())


class TPO:
    """Triple Preference Optimization (arXiv 2405.16681): chosen over rejected, plus NLL on a gold reference.

    Example::

        posttrain train tpo --model ./tiny --dataset triples.jsonl --output_dir out --loss_type tpo-l

    No reference model: the implicit reward is beta * log pi(y|x) of the policy alone.
    """

    name = "tpo"
    config_class = TPOConfig
    dataset_formats = ("preference",)  # plus the `reference` column, validated in posttrain_tpo.data
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: each forward runs its rows as one (1, N) row
    padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    def setup(self, ctx: TrainContext[TPOConfig]) -> None:
        self.padding_free = resolve_padding_free(ctx.model, ctx.config.padding_free)
        if ctx.config.disable_dropout:
            disable_dropout(ctx.model)

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row, for ``posttrain check-data tpo FILE``; ``prepare`` refuses exactly these rows."""
        return row_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[TPOConfig]) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer)

    def collate(self, rows: list[dict], ctx: TrainContext[TPOConfig]) -> dict:
        c = ctx.config
        return collate_rows(rows, ctx.tokenizer.pad_token_id, c.max_length, c.truncation_mode, c.tpo_alpha != 0)

    def loss(self, model: Any, batch: dict, ctx: TrainContext[TPOConfig]) -> LossOutput:
        c = ctx.config
        branches = 3 if c.tpo_alpha != 0 else 2  # the reference rows are left out when their NLL has weight 0
        n = batch["input_ids"].shape[0] // branches  # triples in this micro-batch
        ids, completion = batch["input_ids"], batch["completion_mask"]
        labels = F.pad(ids[:, 1:].masked_fill(~completion[:, 1:].bool(), -100), (0, 1), value=-100)  # (rows, T)
        # the head runs in chunks on completion tokens only: no (rows, T, V) logits (posttrain.ops.token_stats)
        out = token_stats(
            model,
            labels,
            top1=True,
            mean_logit=True,
            # one (1, N) row without padding when padding_free is on (true works without setup; auto needs it, and
            # packs this micro-batch where that is estimated cheaper)
            padding_free=pack_batch(model, c.padding_free is True or self.padding_free, batch["attention_mask"]),
            input_ids=ids,
            attention_mask=batch["attention_mask"],
        )
        valid = labels >= 0  # (branches * n, T)
        n_tokens = valid.sum(-1)  # (branches * n,)
        sums = out.logps.sum(-1)  # (branches * n,), 0 outside completions
        # ipo and tpo-l compare mean log-probs per token (SimPO-style), sigmoid and hinge summed ones
        scores = sums / n_tokens.clamp(min=1) if c.loss_type in LENGTH_NORMALISED else sums
        chosen, rejected = scores[:n], scores[n : 2 * n]  # (n,) each
        losses = LOSSES[c.loss_type](
            chosen_logps=chosen,
            rejected_logps=rejected,
            beta=c.beta,
            gamma=c.tpo_l_gamma,
            label_smoothing=c.label_smoothing,
        )  # (n,)
        metrics: dict[str, Metric] = {}
        if branches == 3:
            nll = reference_nll(sums[2 * n :], n_tokens[2 * n :])  # (n,) mean NLL per reference token
            losses = losses + c.tpo_alpha * nll
            metrics["nll_loss"] = _per_pair(nll.detach())

        with torch.no_grad():
            chosen_rewards, rejected_rewards = c.beta * chosen.detach(), c.beta * rejected.detach()
            mean_logits = out.mean_logit  # (branches * n, T), vocabulary-mean logit, 0 outside completions
            correct = out.top1  # (branches * n, T), False outside completions
            metrics.update(
                {
                    "rewards/chosen": _per_pair(chosen_rewards),
                    "rewards/rejected": _per_pair(rejected_rewards),
                    "rewards/accuracies": _per_pair((chosen_rewards > rejected_rewards).float()),
                    "rewards/margins": _per_pair(chosen_rewards - rejected_rewards),
                    "logps/chosen": _per_pair(chosen.detach()),
                    "logps/rejected": _per_pair(rejected.detach()),
                    # token means over every chosen (rejected) completion token of the logging window
                    "logits/chosen": _per_token(mean_logits[:n], valid[:n]),
                    "logits/rejected": _per_token(mean_logits[n : 2 * n], valid[n : 2 * n]),
                    "mean_token_accuracy": _per_token(correct[:n].float(), valid[:n]),
                }
            )
        return LossOutput(loss_sum=losses.sum(), n_items=n, metrics=metrics)
