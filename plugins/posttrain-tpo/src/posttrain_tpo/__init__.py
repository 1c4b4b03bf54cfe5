"""posttrain-tpo: Triple Preference Optimization (arXiv 2405.16681) as a posttrain method plugin."""

from posttrain_tpo.config import TPOConfig
from posttrain_tpo.loss import LOSSES, hinge_loss, ipo_loss, reference_nll, tpo_l_loss, tpo_loss
from posttrain_tpo.method import TPO

__all__ = [
    "LOSSES",
    "TPO",
    "TPOConfig",
    "hinge_loss",
    "ipo_loss",
    "reference_nll",
    "tpo_l_loss",
    "tpo_loss",
]
