"""Supervised fine-tuning: maximum likelihood of the target tokens.

Papers: "Training language models to follow instructions with human feedback" (InstructGPT, the SFT stage),
https://arxiv.org/abs/2203.02155; the ``dft`` variant is "On the Generalization of SFT: A Reinforcement Learning
Perspective with Reward Rectification", https://arxiv.org/abs/2508.05629.

Objective: L = -(1/N) Σ_t log p_θ(y_t | y_<t), summed over the loss tokens t of every sequence of the optimizer
step and divided by N, their number in the whole step (all micro-batches and processes).
DFT weights each token by its detached probability: L = -(1/N) Σ_t sg(p_θ(y_t | y_<t)) · log p_θ(y_t | y_<t).

Deviations from the papers and from TRL 1.16: none. The functions here return the *sum* over the micro-batch; the
loop divides by N, which is TRL's ``num_items_in_batch`` normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding, non-assistant turns)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts token t+1, so the last position predicts nothing.

    Args:
        labels: (B, T) long, ``IGNORE_INDEX`` where a token carries no loss.

    Returns:
        (B, T) long: ``labels[:, 1:]`` followed by one ``IGNORE_INDEX`` column.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def nll_loss(logps: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies, -Σ log p.

    ``logps`` (B, T) comes from :func:`posttrain.ops.token_logps` on shifted labels: 0 at ignored positions.
    """
    return -logps.sum()


def dft_loss(logps: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning sum, -Σ sg(p) · log p: each token's gradient is scaled by its own probability.

    ``exp(0) = 1`` at ignored positions multiplies a zero log-prob, so they still add nothing.
    """
    return -(logps * logps.detach().exp()).sum()


#: ``loss_type`` name -> loss function (the sum over the loss tokens); ``SFTConfig.loss_type`` lists these names.
LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"nll": nll_loss, "dft": dft_loss}


@torch.no_grad()
def token_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts for TRL's ``mean_token_accuracy`` and ``entropy`` over the loss tokens.

    Args:
        logits: (B, T, V); targets: (B, T) long, ``IGNORE_INDEX`` where ignored.

    Returns:
        (n_loss_tokens, n_correct, entropy_sum), 0-dim tensors. A token is correct when the argmax is the target;
        the entropy is that of the full predicted distribution, -Σ_v p_v log p_v, in nats.
    """
    mask = targets != IGNORE_INDEX  # (B, T)
    picked = logits[mask].float()  # (N, V): only loss positions, so the full-vocabulary softmax stays small
    n_correct = (picked.argmax(-1) == targets[mask]).sum()
    logp = F.log_softmax(picked, dim=-1)
    entropy_sum = -(logp.exp() * logp).sum()
    return mask.sum(), n_correct, entropy_sum
