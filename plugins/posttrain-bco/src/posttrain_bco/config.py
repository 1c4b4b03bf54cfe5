"""BCO configuration: TRL's field names, paper defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig


@dataclass
class BCOConfig(TrainingConfig):
    """Fields of Binary Classifier Optimization on top of the shared training fields."""

    beta: float = 0.1  # scale of the implicit reward beta*log(pi/pi_ref); paper and TRL: 0.1
    max_length: int = 1024  # tokens kept per prompt+completion; the end of the completion is cut (TRL: 1024)
    disable_dropout: bool = True  # set every dropout probability of the policy to 0 (TRL default: true)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster
    udm: bool = False  # density-ratio weighting of undesirable rows (paper's UDM); not supported, must stay false

    def problems(self) -> list[str]:
        found = super().problems()
        if self.beta <= 0:
            found.append(f"beta must be > 0, got {self.beta}; it scales the implicit reward (paper: 0.1)")
        if self.max_length < 2:
            found.append(f"max_length must be >= 2 (one prompt and one completion token), got {self.max_length}")
        if self.udm:
            found.append(
                "udm is true, but posttrain-bco does not implement underlying-distribution matching (the density-ratio "
                "weights from a prompt-embedding classifier, TRL's embedding_func/prompt_sample_size). Set udm false; "
                "the loss is then the paper's BCO without UDM."
            )
        return found
