"""RewardConfig: the reward-model fields on top of the shared TrainingConfig (TRL 1.16 names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig


@dataclass
class RewardConfig(TrainingConfig):
    """Reward modeling on preference pairs. Defaults follow TRL 1.16's ``RewardConfig``."""

    learning_rate: float = 1e-4  # TRL's reward default (transformers' is 5e-5)
    max_length: int | None = 1024  # tokens allowed per sequence (prompt + response); null = no limit
    truncation_mode: Literal["filter", "keep_end"] = (
        "filter"  # pairs over max_length: "filter" drops them (TRL 1.16); "keep_end" cuts each side's start (the prompt) and keeps the scored last token
    )
    center_rewards_coefficient: float | None = (
        None  # c in c*(r_chosen + r_rejected)^2, pulls rewards towards 0; null = off, 0.01 suggested (arXiv 2312.09244)
    )
    disable_dropout: bool = True  # set every dropout probability to 0, as TRL does for reward models
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per micro-batch; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_length is not None and self.max_length < 2:
            found.append(f"max_length must be >= 2 or null, got {self.max_length}")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            found.append(f"center_rewards_coefficient must be >= 0 or null, got {self.center_rewards_coefficient}")
        return found
