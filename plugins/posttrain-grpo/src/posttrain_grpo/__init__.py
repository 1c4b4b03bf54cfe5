"""posttrain-grpo: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) for posttrain."""

from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.loss import (
    bnpo_normalization,
    clipped_surrogate,
    dapo_normalization,
    dr_grpo_normalization,
    group_advantages,
    grpo_loss,
    grpo_normalization,
    k3_kl,
)
from posttrain_grpo.method import GRPO
from posttrain_grpo.rollout import RewardError

__all__ = [
    "GRPO",
    "GRPOConfig",
    "RewardError",
    "bnpo_normalization",
    "clipped_surrogate",
    "dapo_normalization",
    "dr_grpo_normalization",
    "group_advantages",
    "grpo_loss",
    "grpo_normalization",
    "k3_kl",
]
