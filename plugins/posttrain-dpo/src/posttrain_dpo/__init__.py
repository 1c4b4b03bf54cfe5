"""posttrain-dpo: Direct Preference Optimization (Rafailov et al., 2023) for posttrain."""

from posttrain_dpo.config import DPOConfig
from posttrain_dpo.loss import (
    LOSS_TYPES,
    LOSSES,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    sft_loss,
    sppo_hard_loss,
)
from posttrain_dpo.method import DPO

__all__ = [
    "DPO",
    "LOSSES",
    "LOSS_TYPES",
    "DPOConfig",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "dpo_loss",
    "dpo_sigmoid_loss",
    "hinge_loss",
    "ipo_loss",
    "nca_pair_loss",
    "robust_loss",
    "sft_loss",
    "sppo_hard_loss",
]
