"""posttrain-cpo: CPO (Contrastive Preference Optimization, arXiv 2401.08417) with SimPO, AlphaPO, IPO and hinge."""

from posttrain_cpo.config import CPOConfig
from posttrain_cpo.loss import LOSSES, alphapo_loss, alphapo_rewards, cpo_loss, hinge_loss, ipo_loss, simpo_loss
from posttrain_cpo.method import CPO

__all__ = [
    "CPO",
    "LOSSES",
    "CPOConfig",
    "alphapo_loss",
    "alphapo_rewards",
    "cpo_loss",
    "hinge_loss",
    "ipo_loss",
    "simpo_loss",
]
