"""RLOOConfig: TRL 1.16 field names and defaults, only the fields this plugin implements.

Sampling, the generation backend and importance-sampling correction are core's :class:`OnlineConfig` fields.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from posttrain.generation import OnlineConfig
from posttrain.rewards import reward_config_problems


@dataclass
class RLOOConfig(OnlineConfig):
    """REINFORCE Leave-One-Out. As in TRL, `per_device_train_batch_size` counts *completions*: a micro-batch
    holds per_device_train_batch_size / num_generations prompts, each sampled num_generations times."""

    learning_rate: float = 1e-6  # TRL's RLOO default
    max_completion_length: int = 512  # TRL's RLOO default
    # -- rewards
    reward_funcs: list[str] = field(default_factory=list)  # reward names (entry points or hook-registered)
    reward_weights: list[float] | None = None  # one weight per reward function; None -> all 1.0
    reward_kwargs: dict[str, dict] | None = None  # options per reward name, e.g. {format: {pattern: ...}}
    reward_clip_range: list[float] | None = None  # [low, high] clamp of the weighted reward, before the KL penalty
    normalize_advantages: bool = False  # standardise advantages over the micro-batch
    # -- sampling
    num_generations: int = 2  # completions sampled per prompt (k >= 2; the baseline leaves one out)
    mask_truncated_completions: bool = False  # completions that end without EOS get no loss
    # -- objective
    beta: float = 0.05  # KL penalty in the reward: r - beta * sum_t (logp_old - logp_ref); 0 loads no reference model
    epsilon: float = 0.2  # lower clipping bound of the sequence importance ratio: 1 - epsilon
    epsilon_high: float | None = None  # upper bound 1 + epsilon_high; None -> epsilon
    num_iterations: int = 1  # optimizer steps per rollout (mu); the loop reuses each rollout, no data dropped
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster
    use_vllm: bool = False  # deprecated alias of generation_backend: vllm (removed in 3.0)

    def __post_init__(self) -> None:
        if self.use_vllm:
            warnings.warn(
                "use_vllm is deprecated and will be removed in posttrain-rloo 3.0; set generation_backend: vllm "
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
                f"num_generations must be >= 2 (the leave-one-out baseline needs another sample), "
                f"got {self.num_generations}"
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
        if self.beta < 0:
            found.append(f"beta must be >= 0, got {self.beta}")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2 or self.reward_clip_range[0] > self.reward_clip_range[1]
        ):
            found.append(f"reward_clip_range must be [low, high] with low <= high, got {self.reward_clip_range}")
        found += reward_config_problems(self.reward_funcs, self.reward_weights)
        return found
