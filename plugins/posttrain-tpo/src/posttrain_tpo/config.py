"""TPO configuration: TRL's field names and defaults (TRL 1.16 ``TPOConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig

LossType = Literal["sigmoid", "hinge", "ipo", "tpo-l"]  # the names of posttrain_tpo.loss.LOSSES


@dataclass
class TPOConfig(TrainingConfig):
    """Fields of Triple Preference Optimization on top of the shared training fields."""

    learning_rate: float = 5e-7  # TRL's TPO default
    loss_type: LossType = "sigmoid"  # sigmoid (paper's TPO), hinge (SLiC), ipo, tpo-l (length-normalised, margin)
    beta: float = 0.01  # temperature of the preference term; for ipo it is the regulariser tau (TRL: 0.01)
    label_smoothing: float = 0.0  # conservative (noisy-label) smoothing of sigmoid and tpo-l, in [0, 0.5)
    tpo_alpha: float = 1.0  # weight of the NLL on the gold reference completion; 0 skips that forward pass
    tpo_l_gamma: float = 0.5  # target reward margin gamma of tpo-l (TRL: 0.5)
    max_length: int | None = 1024  # tokens kept per prompt+completion sequence; null keeps everything
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"  # which end of a long sequence to keep
    disable_dropout: bool = True  # set every dropout probability of the policy to 0 (TRL default: true)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.beta <= 0:
            found.append(f"beta must be > 0, got {self.beta} (TRL default 0.01)")
        if not 0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            found.append(
                f"label_smoothing={self.label_smoothing} has no meaning for loss_type {self.loss_type!r}; it applies "
                "to 'sigmoid' and 'tpo-l' only. Set label_smoothing 0 or choose one of those losses."
            )
        if self.tpo_alpha < 0:
            found.append(f"tpo_alpha must be >= 0 (0 disables the reference NLL), got {self.tpo_alpha}")
        if self.max_length is not None and self.max_length < 2:
            found.append(f"max_length must be >= 2 or null, got {self.max_length}")
        return found
