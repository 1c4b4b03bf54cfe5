"""posttrain-grpo: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) for posttrain."""

from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.loss import (
    LOSSES,
    bnpo_normalization,
    cispo_surrogate,
    clipped_surrogate,
    dapo_normalization,
    dr_grpo_normalization,
    group_advantages,
    grpo_loss,
    grpo_normalization,
    importance_ratio,
    k3_kl,
    sapo_surrogate,
)
from posttrain_grpo.method import GRPO

__all__ = [
    "GRPO",
    "LOSSES",
    "GRPOConfig",
    "bnpo_normalization",
    "cispo_surrogate",
    "clipped_surrogate",
    "dapo_normalization",
    "dr_grpo_normalization",
    "group_advantages",
    "grpo_loss",
    "grpo_normalization",
    "importance_ratio",
    "k3_kl",
    "sapo_surrogate",
]
