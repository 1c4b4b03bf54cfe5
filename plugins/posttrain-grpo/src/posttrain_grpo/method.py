"""The GRPO method object: wiring between the loop, the rollout and the loss."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import LossOutput

from posttrain_grpo import data
from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.loss import grpo_loss
from posttrain_grpo.rollout import (
    completion_logps,
    eos_token_ids,
    generate_and_score,
    generation_config,
    resolve_reward_funcs,
)


class GRPO:
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) on prompt-only data.

    Example::

        from posttrain.loop import train
        from posttrain_grpo import GRPO, GRPOConfig

        def is_digit(prompts, completions, **columns):
            return [float(c.strip().isdigit()) for c in completions]

        train(GRPO(), GRPOConfig(model="tiny", dataset="prompts.jsonl", max_completion_length=8),
              rewards={"is_digit": is_digit})

    ``num_iterations`` (μ) > 1: at steps where ``step % μ == 0`` each micro-batch's rollout is generated,
    its old log-probs computed, and the rollout kept by micro-batch index; the next μ−1 optimizer steps
    train on the kept rollouts again (the prompts the loop hands those steps are not used). With μ = 1 no
    rollout is kept and the old log-probs are the detached current ones (no extra forward pass).
    """

    name = "grpo"
    config_class = GRPOConfig
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

    def setup(self, ctx: Any) -> None:
        config = ctx.config
        self.reward_names, self.reward_funcs, self.reward_weights = resolve_reward_funcs(config, ctx.rewards, self.name)
        self.eos_ids = eos_token_ids(ctx.model, ctx.tokenizer)
        self.generation_config = generation_config(config, ctx.tokenizer, self.eos_ids)
        if config.beta != 0.0:
            from posttrain.models import reference_model

            self.ref_model = reference_model(ctx)  # None under LoRA: the adapter-disabled policy is the reference
        if config.use_vllm:
            from posttrain_grpo._vllm import VLLMGenerator

            self.vllm = VLLMGenerator(ctx, self.name)

    def prepare(self, dataset: Any, ctx: Any) -> list[dict]:
        return data.prepare(dataset, ctx.tokenizer)

    def collate(self, rows: list[dict], ctx: Any) -> dict:
        return data.collate(rows, ctx.tokenizer.pad_token_id)

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
        loss_sum, n_items, stats = grpo_loss(
            logps,
            logps.detach() if old_logps is None else old_logps,
            batch["advantages"],
            mask,
            loss_type=config.loss_type,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            ref_logps=batch.get("ref_logps"),
            use_bias_correction_kl=config.use_bias_correction_kl,
            max_completion_length=config.max_completion_length,
        )
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return LossOutput(loss_sum, n_items, {**batch["metrics"], **stats})

    def state_dict(self) -> dict:
        return {"buffer": {k: _to(v, torch.device("cpu")) for k, v in self._buffer.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._buffer = dict(state.get("buffer", {}))


def _to(rollout: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rollout.items()}
