"""posttrain-sft: supervised fine-tuning (token-level cross-entropy) for the posttrain loop."""

from posttrain_sft.config import SFTConfig
from posttrain_sft.data import collate, pack_bfd, prepare_rows
from posttrain_sft.loss import dft_loss, nll_loss, shift_labels, token_metrics
from posttrain_sft.method import SFT

__all__ = [
    "SFT",
    "SFTConfig",
    "collate",
    "dft_loss",
    "nll_loss",
    "pack_bfd",
    "prepare_rows",
    "shift_labels",
    "token_metrics",
]
