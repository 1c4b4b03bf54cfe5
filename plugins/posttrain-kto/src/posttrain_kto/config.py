"""KTOConfig: the fields KTO adds to the shared TrainingConfig, with TRL 1.16's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig

LossType = Literal["kto", "apo_zero_unpaired"]  # the names of posttrain_kto.loss.LOSSES


@dataclass
class KTOConfig(TrainingConfig):
    """KTO fields. Defaults follow the paper and TRL 1.16 (``learning_rate`` 1e-6, ``beta`` 0.1)."""

    learning_rate: float = 1e-6  # TRL's KTO default (the shared default is 5e-5)
    beta: float = 0.1  # temperature of the implied reward beta*log(pi/pi_ref) (paper: 0.1)
    loss_type: LossType = "kto"  # kto uses the KL point z0; apo_zero_unpaired has none
    desirable_weight: float = 1.0  # lambda_D, weight of each desirable (label true) example's loss
    undesirable_weight: float = 1.0  # lambda_U, weight of each undesirable (label false) example's loss
    max_length: int | None = 1024  # prompt+completion tokens kept (end cut); rows whose prompt fills it are dropped
    precompute_ref_log_probs: bool = False  # score rows with the reference once before training; keep no reference
    precompute_ref_batch_size: int | None = None  # batch size of that pass (null: per_device_eval_batch_size)
    disable_dropout: bool = True  # set every dropout probability of the policy to 0 (TRL default for KTO)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.beta <= 0:
            found.append(f"beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            found.append(f"max_length must be >= 2 or null, got {self.max_length}")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            found.append(f"precompute_ref_batch_size must be >= 1 or null, got {self.precompute_ref_batch_size}")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2 and not self.precompute_ref_log_probs:
            found.append(
                "loss_type 'kto' estimates its KL point from mismatched pairs inside each micro-batch, so "
                f"per_device_train_batch_size must be >= 2 (got {self.per_device_train_batch_size}); with 1 row the "
                "'mismatched' pair is the row itself. Raise it, set precompute_ref_log_probs true (fixed partners), "
                "or use loss_type apo_zero_unpaired"
            )
        return found
