"""The GRPO method object: wiring between the loop, core's generation and reward services, and the loss."""

from __future__ import annotations

import torch
from posttrain import ConfigError, LossOutput, TrainContext
from posttrain.generation import build_generator, collate_prompts, importance_weights, prepare_prompts, sample
from posttrain.models import eval_mode, pack_batch, reference_forward, reference_model, resolve_padding_free
from posttrain.ops import completion_logps
from posttrain.rewards import RewardSet
from posttrain.vision import model_inputs

from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.loss import group_advantages, grpo_loss


class GRPO:
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) on prompt-only data.

    Example::

        import posttrain
        from posttrain_grpo import GRPO, GRPOConfig

        def is_digit(prompts, completions, **columns):
            return [float(c.strip().isdigit()) for c in completions]

        posttrain.train(GRPO(), GRPOConfig(model="tiny", dataset="prompts.jsonl", max_completion_length=8),
                        rewards={"is_digit": is_digit})
    """

    name = "grpo"
    config_class = GRPOConfig
    dataset_formats = ("prompt_only",)
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: the policy and reference score rollouts as one (1, N) row
    supports_images = True  # prompts with images, for a vision-language model: generated and trained on with them

    def __init__(self) -> None:
        self.rewards: RewardSet | None = None
        self.generator = None
        self.ref_model = None
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    # -- set up and data ------------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext[GRPOConfig]) -> None:
        config = ctx.config
        self.padding_free = resolve_padding_free(ctx.model, config.padding_free)
        self.rewards = RewardSet.resolve(
            config.reward_funcs, config.reward_weights, config.reward_kwargs, ctx=ctx, method=self.name
        )
        self.generator = build_generator(ctx, num_generations=config.num_generations, rewards=self.rewards)
        if config.beta != 0.0:
            self.ref_model = reference_model(ctx)  # None under LoRA: the adapter-disabled policy is the reference

    def prepare(self, dataset, ctx: TrainContext[GRPOConfig]) -> list[dict]:
        rows = prepare_prompts(dataset, ctx.tokenizer, self.name, processor=ctx.processor)
        if ctx.config.padding_free is True and any(r.get("images") for r in rows):
            raise ConfigError(
                "padding_free is true, but the dataset has images: a vision-language model numbers positions and "
                "matches image features to image tokens across a whole row, so sequences with images cannot share "
                "one. Set padding_free false (or auto, which keeps image prompts padded)."
            )
        return rows

    def collate(self, rows: list[dict], ctx: TrainContext[GRPOConfig]) -> dict:
        return collate_prompts(rows, ctx.tokenizer.pad_token_id)

    def rows_per_batch(self, config: GRPOConfig, batch_size: int) -> int:
        """A micro-batch of ``batch_size`` completions holds batch_size / num_generations prompts."""
        return max(1, batch_size // config.num_generations)

    def batch_reuse(self, config: GRPOConfig) -> int:
        return config.num_iterations  # μ optimizer steps on each rollout

    # -- rollout: sample, score, advantages, the log-probs the loss compares against --------------------------

    @torch.no_grad()
    def rollout(self, model, batches: list[dict], ctx: TrainContext[GRPOConfig]) -> list[dict]:
        config = ctx.config
        g = config.num_generations
        rollouts = sample(self.generator, model, batches, ctx, num_generations=g, rewards=self.rewards)
        correct = config.importance_sampling_correction
        correct = self.generator.reports_logps if correct is None else correct
        resolved = config.padding_free is True or self.padding_free  # true works without setup; auto needs it
        out = []
        for r in rollouts:
            advantages, std = group_advantages(r.rewards, g, config.scale_rewards)  # (N,)
            mask = r.completion_mask  # (N, C)
            if config.mask_truncated_completions:
                mask = mask * (~r.is_truncated).unsqueeze(1).long()
            batch = {
                "input_ids": r.input_ids,  # (N, P + C)
                "attention_mask": r.attention_mask,
                "completion_mask": mask,
                "advantages": advantages.to(mask.device),
                "metrics": {
                    **r.metrics,
                    "frac_reward_zero_std": float(torch.isclose(std, torch.zeros_like(std)).float().mean()),
                },
                **r.model_inputs,  # pixel values of a vision-language model's prompts
                "vision_inputs": sorted(r.model_inputs),
            }
            width = mask.size(1)
            free = pack_batch(model, resolved, r.attention_mask)  # auto: packed where estimated cheaper
            images = r.model_inputs
            # the log-probs of the policy that sampled: needed when a rollout is reused (μ > 1) or corrected
            if config.num_iterations > 1 or (correct and r.sampling_logps is not None):
                batch["old_logps"] = completion_logps(
                    model, r.input_ids, r.attention_mask, width, config.temperature, padding_free=free, **images
                )[0]
            if correct and r.sampling_logps is not None:
                batch["is_weights"], is_metrics = importance_weights(
                    batch["old_logps"],
                    r.sampling_logps,
                    mask,
                    config.importance_sampling_mode,
                    config.importance_sampling_clip_min,
                    config.importance_sampling_clip_max,
                )
                batch["metrics"].update(is_metrics)
            if config.beta != 0.0:
                with reference_forward(model, self.ref_model) as ref, eval_mode(ref):
                    batch["ref_logps"] = completion_logps(
                        ref, r.input_ids, r.attention_mask, width, config.temperature, padding_free=free, **images
                    )[0]
            out.append(batch)
        return out

    # -- loss ---------------------------------------------------------------------------------------------------

    def loss(self, model, batch: dict, ctx: TrainContext[GRPOConfig]) -> LossOutput:
        config = ctx.config
        mask = batch["completion_mask"]  # (N, C)
        logps, entropy = completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            mask.size(1),
            config.temperature,
            with_entropy=True,
            # one (1, N) row without the prompts' left padding and the completions' right padding (images: padded)
            padding_free=pack_batch(model, config.padding_free is True or self.padding_free, batch["attention_mask"]),
            **model_inputs(batch),
        )
        old_logps = batch.get("old_logps")
        loss_sum, n_items, stats = grpo_loss(
            logps,
            logps.detach() if old_logps is None else old_logps,
            batch["advantages"],
            mask,
            loss_type=config.loss_type,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            delta=config.delta,
            importance_sampling_level=config.importance_sampling_level,
            sapo_temperature_pos=config.sapo_temperature_pos,
            sapo_temperature_neg=config.sapo_temperature_neg,
            beta=config.beta,
            ref_logps=batch.get("ref_logps"),
            use_bias_correction_kl=config.use_bias_correction_kl,
            max_completion_length=config.max_completion_length,
            is_weights=batch.get("is_weights"),
        )
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return LossOutput(loss_sum, n_items, {**batch["metrics"], **stats})
