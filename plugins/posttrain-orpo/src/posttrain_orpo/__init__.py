"""posttrain-orpo: ORPO (Odds Ratio Preference Optimization, arXiv 2403.07691) for posttrain."""

from posttrain_orpo.config import ORPOConfig
from posttrain_orpo.loss import log1mexp, log_odds_ratio, orpo_loss
from posttrain_orpo.method import ORPO

__all__ = ["ORPO", "ORPOConfig", "log1mexp", "log_odds_ratio", "orpo_loss"]
