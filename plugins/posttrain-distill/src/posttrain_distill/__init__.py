"""posttrain-distill: on-policy distillation with the generalised JSD (GKD, https://arxiv.org/abs/2306.13649)."""

from posttrain_distill.config import DistillConfig
from posttrain_distill.loss import generalized_jsd, top1_agreement
from posttrain_distill.method import Distill
from posttrain_distill.rollout import use_on_policy

__all__ = ["Distill", "DistillConfig", "generalized_jsd", "top1_agreement", "use_on_policy"]
