"""SFTConfig: the shared training fields plus SFT's own, with TRL 1.16's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.config import TrainingConfig

LossType = Literal["nll", "dft"]  # the names of posttrain_sft.loss.LOSSES


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning. Field names and defaults follow TRL's ``SFTConfig`` so its YAML works here."""

    learning_rate: float = 2e-5  # AdamW learning rate (TRL's SFT default 2e-5)
    # -- data
    dataset_text_field: str = "text"  # column holding the text of standard language-modeling rows
    max_length: int | None = 1024  # tokens kept per sequence (end cut off); the bin size when packing; null: no limit
    # -- which tokens carry loss
    completion_only_loss: bool | None = None  # loss on completion tokens only; null = true for prompt/completion rows
    assistant_only_loss: bool = False  # loss on assistant turns only (template needs {% generation %} markers)
    loss_type: LossType = "nll"  # nll = cross-entropy; dft = Dynamic Fine-Tuning (arXiv:2508.05629)
    # -- batching
    packing: bool = False  # best-fit-decreasing packing of whole sequences into max_length rows; implies padding_free
    padding_free: bool | Literal["auto"] = False  # one unpadded row per micro-batch; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_length is not None and self.max_length < 1:
            found.append(f"max_length must be >= 1 or null, got {self.max_length}")
        if self.packing and self.max_length is None:
            found.append("packing is true but max_length is null; packing fills rows of max_length tokens, so set it")
        if not self.dataset_text_field:
            found.append("dataset_text_field is empty; name the column that holds the text (default 'text')")
        return found
