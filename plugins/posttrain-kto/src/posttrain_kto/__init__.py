"""posttrain-kto: Kahneman-Tversky Optimization (https://arxiv.org/abs/2402.01306) for posttrain."""

from posttrain_kto.config import KTOConfig
from posttrain_kto.data import KTOBalanceWarning, balance_warning, unpair_preference
from posttrain_kto.loss import LOSSES, apo_zero_unpaired_loss, kl_reference_point, kto_loss
from posttrain_kto.method import KTO

__all__ = [
    "KTO",
    "LOSSES",
    "KTOBalanceWarning",
    "KTOConfig",
    "apo_zero_unpaired_loss",
    "balance_warning",
    "kl_reference_point",
    "kto_loss",
    "unpair_preference",
]
