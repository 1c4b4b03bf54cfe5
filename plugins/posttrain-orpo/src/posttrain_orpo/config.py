"""ORPOConfig: the fields ORPO adds to the shared training config, with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig


@dataclass
class ORPOConfig(TrainingConfig):
    """ORPO settings. Names follow TRL's ``ORPOConfig``; defaults are the paper's (lambda = 0.1) and TRL's."""

    learning_rate: float = 1e-6  # TRL's default for its preference trainers; tune it for your model
    max_length: int = 1024  # tokens kept per prompt + completion; the completion's end is cut first
    max_prompt_length: int | None = None  # keep only the last N prompt tokens; None = no prompt limit
    beta: float = 0.1  # weight of the odds-ratio term (lambda in the paper, 0.1; `alpha` in the authors' code)
    nll_on_prompt: bool = True  # NLL term over prompt + chosen tokens (TRL); false = chosen completion only
    disable_dropout: bool = True  # set every dropout probability to 0 before training (TRL's default)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_length < 2:
            found.append(f"max_length must be >= 2 (one prompt and one completion token), got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            found.append(
                f"max_prompt_length must be between 1 and max_length - 1 ({self.max_length - 1}) so a completion "
                f"token fits, got {self.max_prompt_length}"
            )
        if self.beta < 0:
            found.append(f"beta must be >= 0 (0 trains on the NLL term alone), got {self.beta}")
        return found
