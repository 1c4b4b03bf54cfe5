"""posttrain-rewards: reward functions for online methods (GRPO, RLOO, ...), as ``posttrain.rewards`` plugins.

Each reward is ``f(prompts, completions, **columns) -> list[float | None]``. Registered names:
``accuracy``, ``format``, ``length_penalty``, ``reward_model``; the ``make_*`` factories build
configured copies to register under names of your own. Options of the registered rewards are typed
dataclasses filled from the run's ``reward_kwargs`` (``{format: {pattern: ...}}``).
"""

from posttrain_rewards._text import completion_text, final_number
from posttrain_rewards.reward_model import (
    RewardModelOptions,
    load_reward_model,
    make_reward_model_reward,
    reward_model,
)
from posttrain_rewards.verifiers import (
    DEFAULT_FORMAT_PATTERN,
    FormatOptions,
    LengthPenaltyOptions,
    accuracy,
    format_reward,
    length_penalty,
    make_format_reward,
    make_length_penalty,
)

__all__ = [
    "DEFAULT_FORMAT_PATTERN",
    "FormatOptions",
    "LengthPenaltyOptions",
    "RewardModelOptions",
    "accuracy",
    "completion_text",
    "final_number",
    "format_reward",
    "length_penalty",
    "load_reward_model",
    "make_format_reward",
    "make_length_penalty",
    "make_reward_model_reward",
    "reward_model",
]
