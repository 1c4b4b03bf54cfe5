"""posttrain-online-dpo: online DPO (Guo et al., "Direct Language Model Alignment from Online AI Feedback",
arXiv 2402.04792) for posttrain."""

from posttrain_online_dpo.config import OnlineDPOConfig
from posttrain_online_dpo.loss import (
    LOSSES,
    dpo_sigmoid_loss,
    ipo_loss,
    online_dpo_loss,
    online_dpo_metrics,
    pair_rows,
    preference_from_scores,
)
from posttrain_online_dpo.method import OnlineDPO

__all__ = [
    "LOSSES",
    "OnlineDPO",
    "OnlineDPOConfig",
    "dpo_sigmoid_loss",
    "ipo_loss",
    "online_dpo_loss",
    "online_dpo_metrics",
    "pair_rows",
    "preference_from_scores",
]
