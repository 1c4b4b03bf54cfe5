"""CPOConfig: the fields CPO and its loss variants add to the shared training config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig

LossType = Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"]  # the names of posttrain_cpo.loss.LOSSES


@dataclass
class CPOConfig(TrainingConfig):
    """CPO settings. Names and defaults follow TRL's ``CPOConfig`` and the CPO paper (beta 0.1, NLL weight 1)."""

    learning_rate: float = 1e-6  # TRL's default for its preference trainers; tune it for your model
    max_length: int = 1024  # tokens kept per prompt + completion; the completion's end is cut first
    max_prompt_length: int | None = None  # keep only the last N prompt tokens; None = no prompt limit
    loss_type: LossType = "sigmoid"  # sigmoid = CPO; hinge (SLiC); ipo; simpo (SimPO); alphapo (AlphaPO)
    beta: float = 0.1  # scale of the log-prob difference (CPO paper 0.1; the SimPO paper uses 2 to 10)
    label_smoothing: float = 0.0  # chance a label is flipped, for sigmoid/simpo/alphapo (0 = the papers)
    cpo_alpha: float | None = None  # weight of the NLL term on chosen; None = 1.0, or 0.0 for alphapo (as TRL)
    simpo_gamma: float = 0.5  # target reward margin gamma of simpo and alphapo (TRL's default 0.5)
    alpha: float = 0.0  # AlphaPO reward shape, alphapo only; 0 gives SimPO's log reward
    disable_dropout: bool = True  # set every dropout probability to 0 before training (TRL's default)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster

    @property
    def nll_weight(self) -> float:
        """``cpo_alpha`` resolved: AlphaPO has no NLL term, every other loss type defaults to CPO's weight 1."""
        if self.cpo_alpha is not None:
            return self.cpo_alpha
        return 0.0 if self.loss_type == "alphapo" else 1.0

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_length < 2:
            found.append(f"max_length must be >= 2 (one prompt and one completion token), got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            found.append(
                f"max_prompt_length must be between 1 and max_length - 1 ({self.max_length - 1}) so a completion "
                f"token fits, got {self.max_prompt_length}"
            )
        if self.beta <= 0:
            found.append(f"beta must be > 0 (hinge, ipo and simpo divide by it), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            found.append(
                f"label_smoothing={self.label_smoothing} has no meaning for loss_type {self.loss_type!r}; "
                "set it to 0 or use loss_type sigmoid, simpo or alphapo"
            )
        if self.alpha != 0 and self.loss_type != "alphapo":
            found.append(
                f"alpha={self.alpha} shapes the reward of loss_type 'alphapo' only, but loss_type is "
                f"{self.loss_type!r}; set loss_type alphapo (with cpo_alpha 1.0 to keep the NLL term) or alpha 0"
            )
        if self.cpo_alpha is not None and self.cpo_alpha < 0:
            found.append(f"cpo_alpha must be >= 0 (0 drops the NLL term), got {self.cpo_alpha}")
        return found
