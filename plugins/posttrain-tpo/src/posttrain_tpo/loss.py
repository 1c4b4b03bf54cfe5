"""Triple Preference Optimization: Achieving Better Alignment using a Single Step Optimization (Saeidi et al.).

https://arxiv.org/abs/2405.16681

Objective per triple (no reference model): l = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x))) + tpo_alpha * NLL(y_ref|x).
``loss_type`` swaps the preference term for one of the named functions below; ``ipo`` and ``tpo-l`` score
length-normalised log-probs (mean per completion token), ``sigmoid`` and ``hinge`` summed ones, as in TRL 1.16.

Deviations from the paper:
1. ``hinge`` (SLiC) and ``ipo`` are TRL's extra variants, not in the paper; ``label_smoothing`` (TRL) is not either.
2. The NLL of the reference completion is the mean over *that triple's* reference tokens, so each triple
   contributes one number and the loss is a sum over triples divided by the triples of the optimizer step.
   TRL 1.16 averages the NLL over all reference tokens of the micro-batch instead; the two agree whenever the
   reference completions of a micro-batch have equal token counts, and only this one is independent of how the
   rows are grouped into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def tpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """The paper's TPO preference term (``loss_type="sigmoid"``), a Bradley-Terry loss on summed log-probs.

    Args:
        chosen_logps, rejected_logps: (B,) summed completion log-probs under the policy.
        beta: temperature (TRL: 0.01).
        label_smoothing: probability that a label is flipped (0 = the paper's loss).

    Returns:
        (B,) -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta), delta = chosen - rejected.
    """
    logits = beta * (chosen_logps - rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, **_) -> torch.Tensor:
    """SLiC hinge on summed log-probs: (B,) relu(1 - beta * (chosen - rejected))."""
    return torch.relu(1 - beta * (chosen_logps - rejected_logps))


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, **_) -> torch.Tensor:
    """IPO's squared loss (its Eq. 17) on length-normalised log-probs; beta plays IPO's tau.

    Returns:
        (B,) (chosen - rejected - 1 / (2 beta))^2.
    """
    return (chosen_logps - rejected_logps - 1 / (2 * beta)) ** 2


def tpo_l_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    **_,
) -> torch.Tensor:
    """TPO-L: the sigmoid loss on length-normalised log-probs with a target reward margin gamma.

    Returns:
        (B,) sigmoid loss of beta * (chosen - rejected) - gamma (TRL writes it beta * (delta - gamma / beta)).
    """
    return tpo_loss(chosen_logps - gamma / beta, rejected_logps, beta, label_smoothing)


def reference_nll(ref_logps: torch.Tensor, ref_n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of each gold reference completion.

    Args:
        ref_logps: (B,) summed log-probs of the reference completions.
        ref_n_tokens: (B,) their token counts (a fully truncated completion counts 1, giving NLL 0).

    Returns:
        (B,) -ref_logps / ref_n_tokens.
    """
    return -ref_logps / ref_n_tokens.clamp(min=1)


#: ``loss_type`` name -> preference term (B,). The method calls each with the same keyword arguments
#: (``chosen_logps``, ``rejected_logps``, ``beta``, ``gamma``, ``label_smoothing``); ``**_`` takes the ones a function
#: does not use. ``TPOConfig.loss_type`` lists these names.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": tpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "tpo-l": tpo_l_loss,
}
#: loss types that compare mean per-token log-probs instead of sums
LENGTH_NORMALISED = ("ipo", "tpo-l")
