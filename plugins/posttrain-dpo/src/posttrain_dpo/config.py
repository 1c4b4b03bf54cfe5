"""DPOConfig: the DPO fields on top of posttrain's shared TrainingConfig (TRL 1.16 names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.config import TrainingConfig

LossType = Literal[
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "sft"
]


@dataclass
class DPOConfig(TrainingConfig):
    """DPO options. Defaults are TRL 1.16's DPOConfig defaults, which follow the DPO paper."""

    learning_rate: float = 1e-6  # TRL's DPO default; tiny models need ~1e-3
    beta: float = 0.1  # deviation from the reference; higher stays closer (paper: 0.1-0.5). tau for ipo
    loss_type: list[LossType] = field(default_factory=lambda: ["sigmoid"])  # summed, weighted by loss_weights
    loss_weights: list[float] | None = None  # one weight per loss_type (default 1.0 each), e.g. MPO [0.8, 0.2, 1.0]
    label_smoothing: float = 0.0  # eps in [0, 0.5): flipped-label rate for sigmoid (cDPO) and robust
    rpo_alpha: float | None = None  # weight of the chosen NLL term (RPO paper: 1.0); None disables it
    reference_free: bool = False  # use a uniform reference (log pi_ref = 0): no reference model at all
    precompute_ref_log_probs: bool = False  # score the reference once before training, then drop it
    precompute_ref_batch_size: int | None = None  # batch size of that pass; None -> per_device_train_batch_size
    max_length: int | None = 1024  # tokens kept of prompt+completion; the end of the completion is cut
    max_prompt_length: int | None = None  # tokens kept of the prompt; its start is cut. None keeps all
    disable_dropout: bool = True  # zero every dropout in the policy (and the reference), as TRL does
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per micro-batch; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.beta <= 0:
            found.append(
                f"beta must be > 0, got {self.beta}; it scales the log-ratios (ipo and sppo_hard divide by it)"
            )
        if not self.loss_type:
            found.append("loss_type is empty; name at least one loss, e.g. [sigmoid]")
        duplicates = sorted({t for t in self.loss_type if self.loss_type.count(t) > 1})
        if duplicates:
            found.append(f"loss_type lists {duplicates} more than once; give it once with a larger loss_weights entry")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            found.append(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(self.loss_type)} "
                f"({self.loss_type}); give one weight per loss type"
            )
        if not 0 <= self.label_smoothing < 0.5:
            found.append(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}; it is the probability that a "
                "preference label is flipped, and 0.5 would make every label noise"
            )
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            found.append(f"rpo_alpha must be >= 0 or null, got {self.rpo_alpha}")
        if self.reference_free and self.precompute_ref_log_probs:
            found.append(
                "reference_free and precompute_ref_log_probs are both true; a reference-free run has nothing "
                "to precompute, so set one of them to false"
            )
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            found.append(f"precompute_ref_batch_size must be >= 1 or null, got {self.precompute_ref_batch_size}")
        if self.max_length is not None and self.max_length < 2:
            found.append(f"max_length must be >= 2 or null, got {self.max_length}")
        if self.max_prompt_length is not None:
            if self.max_prompt_length < 1:
                found.append(f"max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
            elif self.max_length is not None and self.max_prompt_length >= self.max_length:
                found.append(
                    f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                    f"({self.max_length}), or no completion token would be left to train on"
                )
        return found
