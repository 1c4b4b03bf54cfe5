"""The RLOO method object: wiring between the loop, the rollout and the loss."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import LossOutput

from posttrain_rloo import data
from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.loss import rloo_loss
from posttrain_rloo.rollout import (
    completion_logps,
    eos_token_ids,
    generate_and_score,
    generation_config,
    resolve_reward_funcs,
)


class RLOO:
    """REINFORCE Leave-One-Out (Ahmadian et al., arXiv 2402.14740) on prompt-only data.

    Example::

        from posttrain.loop import train
        from posttrain_rloo import RLOO, RLOOConfig

        def is_digit(prompts, completions, **columns):
            return [float(c.strip().isdigit()) for c in completions]

        train(RLOO(), RLOOConfig(model="tiny", dataset="prompts.jsonl", max_completion_length=8),
              rewards={"is_digit": is_digit})

    ``num_iterations`` (μ) > 1 keeps each micro-batch's rollout (with its old log-probs) at steps where
    ``step % μ == 0`` and trains on it again for the next μ−1 optimizer steps, as in posttrain-grpo.
    """

    name = "rloo"
    config_class = RLOOConfig
    dataset_formats = data.FORMATS

    def __init__(self) -> None:
        self.reward_names: list[str] = []
        self.reward_funcs: list = []
        self.reward_weights = torch.ones(0)
        self.ref_model = None
        self.vllm = None
        self.eos_ids: list[int] = []
        self.generation_config = None
        self._buffer: dict[int, dict] = {}  # micro_step -> rollout, reused while num_iterations > 1

    # Copied from posttrain_grpo.method.GRPO.setup with grpo->rloo
    def setup(self, ctx: Any) -> None:
        config = ctx.config
        self.reward_names, self.reward_funcs, self.reward_weights = resolve_reward_funcs(config, ctx.rewards, self.name)
        self.eos_ids = eos_token_ids(ctx.model, ctx.tokenizer)
        self.generation_config = generation_config(config, ctx.tokenizer, self.eos_ids)
        if config.beta != 0.0:
            from posttrain.models import reference_model

            self.ref_model = reference_model(ctx)  # None under LoRA: the adapter-disabled policy is the reference
        if config.use_vllm:
            from posttrain_rloo._vllm import VLLMGenerator

            self.vllm = VLLMGenerator(ctx, self.name)

    def prepare(self, dataset: Any, ctx: Any) -> list[dict]:
        return data.prepare(dataset, ctx.tokenizer)

    def collate(self, rows: list[dict], ctx: Any) -> dict:
        return data.collate(rows, ctx.tokenizer.pad_token_id)

    # Copied from posttrain_grpo.method.GRPO.rollout
    def rollout(self, model: Any, batch: dict, ctx: Any) -> dict:
        mu = ctx.config.num_iterations
        reuse = ctx.training and mu > 1
        if reuse and ctx.step % mu != 0 and ctx.micro_step in self._buffer:
            return _to(self._buffer[ctx.micro_step], ctx.device)
        out = generate_and_score(self, model, batch, ctx, old_logps=reuse, ref_model=self.ref_model)
        if reuse:
            self._buffer[ctx.micro_step] = out
        return out

    def loss(self, model: Any, batch: dict, ctx: Any) -> LossOutput:
        if "completion_mask" not in batch:  # a collated batch that did not go through the loop's rollout
            with torch.no_grad():
                batch = self.rollout(ctx.model if ctx.model is not None else model, batch, ctx)
        config = ctx.config
        mask = batch["completion_mask"]  # (N, C)
        logps, entropy = completion_logps(
            model, batch["input_ids"], batch["attention_mask"], mask.size(1), config.temperature, with_entropy=True
        )
        old_logps = batch.get("old_logps")
        loss_sum, n_items, stats = rloo_loss(
            logps,
            logps.detach() if old_logps is None else old_logps,
            batch["advantages"],
            mask,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
        )
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return LossOutput(loss_sum, n_items, {**batch["metrics"], **stats})

    def state_dict(self) -> dict:
        return {"buffer": {k: _to(v, torch.device("cpu")) for k, v in self._buffer.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._buffer = dict(state.get("buffer", {}))


# Copied from posttrain_grpo.method._to
def _to(rollout: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rollout.items()}
