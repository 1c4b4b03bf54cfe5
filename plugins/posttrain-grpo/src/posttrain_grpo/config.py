"""GRPOConfig: TRL 1.16 field names and defaults, only the fields this plugin implements.

Sampling, the generation backend and importance-sampling correction are core's :class:`OnlineConfig` fields.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from posttrain.generation import OnlineConfig
from posttrain.rewards import reward_config_problems

from posttrain_grpo.loss import LOSSES

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


@dataclass
class GRPOConfig(OnlineConfig):
    """Group Relative Policy Optimization. As in TRL, `per_device_train_batch_size` counts *completions*: a
    micro-batch holds per_device_train_batch_size / num_generations prompts, each sampled num_generations times."""

    learning_rate: float = 1e-6  # TRL's GRPO default
    max_completion_length: int = 512  # TRL's GRPO default
    # -- rewards
    reward_funcs: list[str] = field(default_factory=list)  # reward names (entry points or hook-registered)
    reward_weights: list[float] | None = None  # one weight per reward function; None -> all 1.0
    reward_kwargs: dict[str, dict] | None = None  # options per reward name, e.g. {format: {pattern: ...}}
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantages / group std, micro-batch std, or 1
    # -- sampling
    num_generations: int = 8  # completions sampled per prompt (the group size G, >= 2)
    mask_truncated_completions: bool = False  # completions that end without EOS get no loss
    # -- objective
    loss_type: LossType = "dapo"  # surrogate and token aggregation (see the README table)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: one ratio per completion (GSPO)
    beta: float = 0.0  # KL coefficient (k3 estimator); 0 loads no reference model
    use_bias_correction_kl: bool = True  # multiply the per-token KL by the importance ratio, as TRL
    epsilon: float = 0.2  # lower clipping bound of the importance ratio: 1 - epsilon
    epsilon_high: float | None = None  # upper bound 1 + epsilon_high (DAPO: 0.28); cispo: the weight cap (5.0)
    delta: float | None = None  # INTELLECT-2 two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon)
    sapo_temperature_pos: float = 1.0  # sapo: temperature for tokens with positive advantage
    sapo_temperature_neg: float = 1.05  # sapo: temperature for tokens with non-positive advantage
    num_iterations: int = 1  # optimizer steps per rollout (mu); the loop reuses each rollout, no data dropped
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster
    use_vllm: bool = False  # deprecated alias of generation_backend: vllm (removed in 3.0)

    def __post_init__(self) -> None:
        if self.use_vllm:
            warnings.warn(
                "use_vllm is deprecated and will be removed in posttrain-grpo 3.0; set generation_backend: vllm "
                "(in-process) or vllm-server instead.",
                FutureWarning,
                stacklevel=3,
            )
            if self.generation_backend == "hf":
                self.generation_backend = "vllm"
            self.use_vllm = False  # the saved config records the backend, not the alias

    def problems(self) -> list[str]:
        found = super().problems()
        if self.num_generations < 2:
            found.append(
                f"num_generations must be >= 2 (group-relative advantages need a group), got {self.num_generations}"
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            size = getattr(self, name)
            if size >= 1 and self.num_generations >= 2 and size % self.num_generations:
                found.append(
                    f"{name} ({size}) counts completions and must be a multiple of num_generations "
                    f"({self.num_generations}) so every prompt's group fits in one micro-batch; use e.g. "
                    f"{max(1, size // self.num_generations) * self.num_generations}"
                )
        if self.num_iterations < 1:
            found.append(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            found.append(f"epsilon and epsilon_high must be >= 0, got {self.epsilon} and {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.epsilon:
            found.append(f"delta must be > 1 + epsilon ({1 + self.epsilon}) when set, got {self.delta}")
        if self.beta < 0:
            found.append(f"beta must be >= 0, got {self.beta}")
        if min(self.sapo_temperature_pos, self.sapo_temperature_neg) <= 0:
            found.append("sapo_temperature_pos and sapo_temperature_neg must be > 0")
        if self.loss_type not in LOSSES:  # the Literal already says so; kept in sync with loss.LOSSES
            found.append(f"loss_type must be one of {', '.join(LOSSES)}, got {self.loss_type!r}")
        found += reward_config_problems(self.reward_funcs, self.reward_weights)
        return found
