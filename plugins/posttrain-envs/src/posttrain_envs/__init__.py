"""Environments for agentic RL with posttrain: ``calculator`` (a tool for arithmetic) and ``guess-number`` (a
multi-turn game). Train against one by name: ``posttrain train grpo --environment calculator ...``."""

from posttrain_envs.calculator import Calculator, calculate, evaluate
from posttrain_envs.guess_number import GuessNumber

__all__ = ["Calculator", "GuessNumber", "calculate", "evaluate"]
