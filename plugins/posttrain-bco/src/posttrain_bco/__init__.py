"""posttrain-bco: Binary Classifier Optimization (arXiv 2404.04656) as a posttrain method plugin."""

from posttrain_bco.config import BCOConfig
from posttrain_bco.loss import bco_loss, implicit_rewards, update_running_mean
from posttrain_bco.method import BCO

__all__ = ["BCO", "BCOConfig", "bco_loss", "implicit_rewards", "update_running_mean"]
