"""posttrain-rloo: REINFORCE Leave-One-Out (Ahmadian et al., arXiv 2402.14740) for posttrain."""

from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.loss import kl_penalized_rewards, rloo_advantages, rloo_loss
from posttrain_rloo.method import RLOO

__all__ = ["RLOO", "RLOOConfig", "kl_penalized_rewards", "rloo_advantages", "rloo_loss"]
