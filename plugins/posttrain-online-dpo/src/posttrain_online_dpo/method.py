"""The online DPO method object: wiring between the loop, core's generation, reward and judge services, and the loss."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import ConfigError, LossOutput, Metric, TrainContext
from posttrain.generation import build_generator, collate_prompts, prepare_prompts, sample
from posttrain.models import (
    disable_dropout,
    eval_mode,
    pack_batch,
    reference_forward,
    reference_model,
    resolve_padding_free,
)
from posttrain.ops import completion_logps
from posttrain.rewards import Judge, RewardSet, is_judge

from posttrain_online_dpo.config import OnlineDPOConfig
from posttrain_online_dpo.loss import online_dpo_loss, online_dpo_metrics, pair_rows, preference_from_scores


class OnlineDPO:
    """Online DPO (Guo et al., arXiv 2402.04792): DPO on two samples of the current policy, ranked as they come.

    Example::

        import posttrain
        from posttrain_online_dpo import OnlineDPO, OnlineDPOConfig

        def is_digit(prompts, completions, **columns):
            return [float(c.strip().isdigit()) for c in completions]

        posttrain.train(OnlineDPO(), OnlineDPOConfig(model="tiny", dataset="prompts.jsonl", max_completion_length=8),
                        rewards={"is_digit": is_digit})
    """

    name = "online-dpo"
    config_class = OnlineDPOConfig
    dataset_formats = ("prompt_only",)
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: the policy and reference score each pair as one (1, N) row

    def __init__(self) -> None:
        self.rewards: RewardSet | None = None  # ranks by score, or
        self.judge: Judge | None = None  # ranks by pairwise preference
        self.generator = None
        self.ref_model = None  # None under LoRA: the adapter-disabled policy is the reference
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    # -- set up and data ------------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext[OnlineDPOConfig]) -> None:
        config = ctx.config
        self.padding_free = resolve_padding_free(ctx.model, config.padding_free)
        given_judges = [name for name, func in ctx.rewards.items() if is_judge(func)]
        if not (config.judge or config.reward_funcs or len(ctx.rewards) > len(given_judges)):
            hint = (
                f"; the run was given the judge {given_judges[0]!r}: set judge: {given_judges[0]}"
                if given_judges
                else ""
            )
            raise ConfigError(
                f"{self.name} ranks the two samples of each prompt with reward functions or a pairwise judge, and has "
                "neither: set reward_funcs (a reward model too: `--reward_funcs reward_model` with posttrain-rewards), "
                f"or judge (a posttrain.rewards entry point marked @judge), or pass rewards= to posttrain.train{hint}"
            )
        if config.judge:
            self.judge = Judge.resolve(config.judge, config.judge_kwargs, ctx=ctx, method=self.name)
        else:
            self.rewards = RewardSet.resolve(
                config.reward_funcs, config.reward_weights, config.reward_kwargs, ctx=ctx, method=self.name
            )
        self.generator = build_generator(ctx)
        self.ref_model = reference_model(ctx)
        if config.disable_dropout:
            for model in (ctx.model, self.ref_model):
                if model is not None:
                    disable_dropout(model)

    def prepare(self, dataset, ctx: TrainContext[OnlineDPOConfig]) -> list[dict]:
        return prepare_prompts(dataset, ctx.tokenizer, self.name)

    def collate(self, rows: list[dict], ctx: TrainContext[OnlineDPOConfig]) -> dict:
        return collate_prompts(rows, ctx.tokenizer.pad_token_id)

    def rows_per_batch(self, config: OnlineDPOConfig, batch_size: int) -> int:
        """``per_device_train_batch_size`` counts prompts (one pair each), as in TRL's online DPO."""
        return batch_size

    # -- rollout: two samples per prompt, ranked, ordered [chosen; rejected], scored by the reference ----------

    @torch.no_grad()
    def rollout(self, model, batches: list[dict], ctx: TrainContext[OnlineDPOConfig]) -> list[dict]:
        config = ctx.config
        out = []
        for r in sample(self.generator, model, batches, ctx, num_generations=2, rewards=self.rewards):
            batch = {"metrics": dict(r.metrics)}
            if self.judge is not None:
                ids = [row[m.bool()].tolist() for row, m in zip(r.completion_ids.cpu(), r.completion_mask.cpu())]
                winner = self.judge.compare(
                    r.prompts[::2],
                    [list(pair) for pair in zip(r.completions[::2], r.completions[1::2])],
                    {name: values[::2] for name, values in r.columns.items()},
                    [list(pair) for pair in zip(ids[::2], ids[1::2])],
                    r.row_index,
                    ctx.step + 1,
                ).to(r.completion_ids.device)
            else:
                scores = r.rewards.clone()  # (2P,)
                if config.missing_eos_penalty is not None:
                    scores[r.is_truncated] -= config.missing_eos_penalty
                winner = preference_from_scores(scores)
            rows = torch.cat(pair_rows(winner))  # (2P,): the chosen sample of every pair, then the rejected one
            if self.judge is None:
                batch["scores"] = scores[rows]
            mask = r.completion_mask[rows]  # (2P, C)
            attention_mask = _truncate_prompts(r.prompt_mask[rows], mask, config.max_length)
            start = int(attention_mask.any(dim=0).nonzero()[0])  # drop columns no row attends to
            batch.update(
                input_ids=r.input_ids[rows, start:],
                attention_mask=attention_mask[:, start:],
                completion_mask=mask,
                winner=winner,  # (P,)
                truncated=r.is_truncated[rows],  # (2P,)
            )
            with reference_forward(model, self.ref_model) as ref, eval_mode(ref):
                batch["ref_logps"] = _summed_logps(ref, batch, self._free(config))
            out.append(batch)
        return out

    # -- loss -----------------------------------------------------------------------------------------------------

    def loss(self, model, batch: dict, ctx: TrainContext[OnlineDPOConfig]) -> LossOutput:
        config = ctx.config
        logps = _summed_logps(model, batch, self._free(config))  # (2P,) [chosen; rejected]
        ranked = ~torch.isnan(batch["winner"])  # (P,)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        loss_sum, n_items, _ = online_dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, ranked, config.beta, config.loss_type
        )
        stats = online_dpo_metrics(
            logps.detach(), batch["ref_logps"], ranked, batch["truncated"], config.beta, batch.get("scores")
        )  # TRL's names; exact means over the logging window
        metrics = {**batch["metrics"], **{name: Metric.ratio(*parts) for name, parts in stats.items()}}
        return LossOutput(loss_sum, n_items, {**metrics, "beta": config.beta})

    def _free(self, config: OnlineDPOConfig) -> bool | str:
        """Padding-free forwards (for :func:`posttrain.models.pack_batch`, which decides each forward's layout):
        true is honoured without setup (which checks the model); auto needs setup."""
        return config.padding_free is True or self.padding_free


def _summed_logps(model: Any, batch: dict, padding_free: bool | str = False) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each completion's tokens, at temperature 1 (the policy itself, as TRL). (N,)

    ``padding_free`` (``True``, ``False`` or ``"auto"``: :func:`posttrain.models.pack_batch` decides) runs the rows as
    one (1, N) row without the prompts' left padding (same sums, to rounding).
    """
    mask = batch["completion_mask"]  # (N, C)
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    free = pack_batch(model, padding_free, attention_mask)
    logps = completion_logps(model, ids, attention_mask, mask.size(1), padding_free=free)[0]  # (N, C)
    return (logps * mask).sum(-1)


def _truncate_prompts(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """The attention mask (N, P + C) that keeps the last max_length − |y| prompt tokens of each row.

    TRL cuts the prompt's start so that prompt + completion fits max_length; cutting per row (by masking the
    tokens, which then count as left padding) keeps that independent of how rows are batched and padded.
    """
    keep = max_length - completion_mask.sum(dim=1, keepdim=True)  # (N, 1), >= 1 as the config requires
    from_end = prompt_mask.flip(1).cumsum(1).flip(1)  # real prompt tokens from each position to the end
    return torch.cat([prompt_mask * (from_end <= keep), completion_mask], dim=1)
