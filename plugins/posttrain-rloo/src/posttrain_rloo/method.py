"""The RLOO method object: wiring between the loop, core's generation and reward services, and the loss."""

from __future__ import annotations

import torch
from posttrain import LossOutput, TrainContext
from posttrain.generation import build_generator, collate_prompts, importance_weights, prepare_prompts, sample
from posttrain.models import eval_mode, pack_batch, reference_forward, reference_model, resolve_padding_free
from posttrain.ops import completion_logps
from posttrain.rewards import RewardSet

from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.loss import kl_penalized_rewards, rloo_advantages, rloo_loss


class RLOO:
    """REINFORCE Leave-One-Out (Ahmadian et al., arXiv 2402.14740) on prompt-only data.

    Example::

        import posttrain
        from posttrain_rloo import RLOO, RLOOConfig

        def is_digit(prompts, completions, **columns):
            return [float(c.strip().isdigit()) for c in completions]

        posttrain.train(RLOO(), RLOOConfig(model="tiny", dataset="prompts.jsonl", max_completion_length=8),
                        rewards={"is_digit": is_digit})
    """

    name = "rloo"
    config_class = RLOOConfig
    dataset_formats = ("prompt_only",)
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: the policy and reference score rollouts as one (1, N) row

    def __init__(self) -> None:
        self.rewards: RewardSet | None = None
        self.generator = None
        self.ref_model = None
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    # Copied from posttrain_grpo.method.GRPO.setup with GRPO->RLOO
    def setup(self, ctx: TrainContext[RLOOConfig]) -> None:
        config = ctx.config
        self.padding_free = resolve_padding_free(ctx.model, config.padding_free)
        self.rewards = RewardSet.resolve(
            config.reward_funcs, config.reward_weights, config.reward_kwargs, ctx=ctx, method=self.name
        )
        self.generator = build_generator(ctx, num_generations=config.num_generations, rewards=self.rewards)
        if config.beta != 0.0:
            self.ref_model = reference_model(ctx)  # None under LoRA: the adapter-disabled policy is the reference

    def prepare(self, dataset, ctx: TrainContext[RLOOConfig]) -> list[dict]:
        return prepare_prompts(dataset, ctx.tokenizer, self.name)

    def collate(self, rows: list[dict], ctx: TrainContext[RLOOConfig]) -> dict:
        return collate_prompts(rows, ctx.tokenizer.pad_token_id)

    # Copied from posttrain_grpo.method.GRPO.rows_per_batch with GRPO->RLOO
    def rows_per_batch(self, config: RLOOConfig, batch_size: int) -> int:
        """A micro-batch of ``batch_size`` completions holds batch_size / num_generations prompts."""
        return max(1, batch_size // config.num_generations)

    # Copied from posttrain_grpo.method.GRPO.batch_reuse with GRPO->RLOO
    def batch_reuse(self, config: RLOOConfig) -> int:
        return config.num_iterations  # μ optimizer steps on each rollout

    @torch.no_grad()
    def rollout(self, model, batches: list[dict], ctx: TrainContext[RLOOConfig]) -> list[dict]:
        """Sample k completions per prompt, clip the rewards, subtract the KL penalty, leave-one-out advantages."""
        config = ctx.config
        k = config.num_generations
        rollouts = sample(self.generator, model, batches, ctx, num_generations=k, rewards=self.rewards)
        correct = config.importance_sampling_correction
        correct = self.generator.reports_logps if correct is None else correct
        resolved = config.padding_free is True or self.padding_free  # true works without setup; auto needs it
        out = []
        for r in rollouts:
            mask = r.completion_mask  # (N, C)
            if config.mask_truncated_completions:
                mask = mask * (~r.is_truncated).unsqueeze(1).long()
            rewards = r.rewards.clamp(*config.reward_clip_range) if config.reward_clip_range else r.rewards  # (N,)
            batch = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "completion_mask": mask}
            metrics = dict(r.metrics)
            width = mask.size(1)
            free = pack_batch(model, resolved, r.attention_mask)  # auto: packed where estimated cheaper
            # the sampling policy's log-probs: for the KL penalty, for reuse (μ > 1) and for the correction
            needs_old = config.beta != 0.0 or config.num_iterations > 1 or (correct and r.sampling_logps is not None)
            if needs_old:
                with eval_mode(model):
                    old = completion_logps(
                        model, r.input_ids, r.attention_mask, width, config.temperature, padding_free=free
                    )[0]
                batch["old_logps"] = old
            if correct and r.sampling_logps is not None:
                batch["is_weights"], is_metrics = importance_weights(
                    old,
                    r.sampling_logps,
                    mask,
                    config.importance_sampling_mode.replace("token_", "sequence_"),  # the loss is per sequence
                    config.importance_sampling_clip_min,
                    config.importance_sampling_clip_max,
                )
                metrics.update(is_metrics)
            if config.beta != 0.0:
                with reference_forward(model, self.ref_model) as ref, eval_mode(ref):
                    ref_logps = completion_logps(
                        ref, r.input_ids, r.attention_mask, width, config.temperature, padding_free=free
                    )[0]
                rewards, per_token_kl = kl_penalized_rewards(rewards, old, ref_logps, mask, config.beta)
                metrics["kl"] = float(per_token_kl.sum() / mask.sum().clamp(min=1))
            advantages, std = rloo_advantages(rewards.cpu(), k, config.normalize_advantages)
            batch["advantages"] = advantages.to(mask.device)  # (N,)
            metrics["frac_reward_zero_std"] = float(torch.isclose(std, torch.zeros_like(std)).float().mean())
            batch["metrics"] = metrics
            out.append(batch)
        return out

    def loss(self, model, batch: dict, ctx: TrainContext[RLOOConfig]) -> LossOutput:
        config = ctx.config
        mask = batch["completion_mask"]  # (N, C)
        logps, entropy = completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            mask.size(1),
            config.temperature,
            with_entropy=True,
            # one (1, N) row without the prompts' left padding and the completions' right padding
            padding_free=pack_batch(model, config.padding_free is True or self.padding_free, batch["attention_mask"]),
        )
        old_logps = batch.get("old_logps")
        loss_sum, n_items, stats = rloo_loss(
            logps,
            logps.detach() if old_logps is None or config.num_iterations == 1 else old_logps,
            batch["advantages"],
            mask,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            is_weights=batch.get("is_weights"),
        )
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return LossOutput(loss_sum, n_items, {**batch["metrics"], **stats})
