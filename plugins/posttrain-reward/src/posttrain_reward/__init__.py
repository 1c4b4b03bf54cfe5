"""posttrain-reward: reward modeling (a scalar sequence-classification head, Bradley–Terry loss) for posttrain."""

from posttrain_reward.config import RewardConfig
from posttrain_reward.data import check_pairs, collate_pairs, encode, pair_problems, prepare_pairs
from posttrain_reward.loss import bradley_terry_loss, reward_metrics
from posttrain_reward.method import Reward

__all__ = [
    "Reward",
    "RewardConfig",
    "bradley_terry_loss",
    "check_pairs",
    "collate_pairs",
    "encode",
    "pair_problems",
    "prepare_pairs",
    "reward_metrics",
]
