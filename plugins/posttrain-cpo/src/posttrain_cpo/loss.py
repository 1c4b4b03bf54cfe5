"""Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation
https://arxiv.org/abs/2401.08417

Objective, per pair (x, y_w, y_l):  L = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x))) + cpo_alpha * NLL(y_w|x),
DPO's loss with a uniform reference model (which cancels) plus a behaviour-cloning term on the chosen completion.

Variants on the same batch (``loss_type``), each a function below: ``hinge`` (SLiC, arXiv 2305.10425),
``ipo`` (arXiv 2310.12036), ``simpo`` (SimPO, arXiv 2405.14734: mean log-probs and a target margin gamma),
``alphapo`` (AlphaPO, arXiv 2501.03884: SimPO on the reward (1 - p^-alpha) / alpha, p the per-token mean
likelihood). sigmoid and hinge compare summed log-probs; ipo, simpo and alphapo compare token means.

Deviations from the paper and from TRL 1.16 (the parity reference):
1. The NLL term is the mean over the chosen completion's tokens, as TRL 1.16 computes it, not the
   summed log pi(y_w|x) the paper writes. It is taken per pair and averaged over pairs; TRL takes one token mean
   over every chosen completion of the micro-batch. The two agree exactly when a micro-batch's chosen
   completions have equal token counts; otherwise TRL weights pair i by T_i / mean T.
2. ``label_smoothing`` (conservative DPO, from TRL) is an addition; its default 0 is the paper's loss.
3. ``ipo`` compares mean per-token log-probs, as TRL's CPO trainer does (the IPO paper uses summed log-ratios
   against a reference model).
4. ``alpha`` shapes the reward of ``loss_type="alphapo"`` only; TRL also applies it to the other loss types,
   where p = exp(summed log-probs) makes p^-alpha overflow on long completions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def cpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """CPO's preference loss (Eq. 3): ``-log sigmoid(beta * (chosen - rejected))``, optionally label-smoothed.

    Args:
        chosen_logps, rejected_logps: (B,) summed completion log-probs.
        beta: scale of the difference, default 0.1.
        label_smoothing: weight eps of the flipped label: ``-(1-eps) log s(bx) - eps log s(-bx)``, default 0.

    Returns:
        (B,) per-pair losses.
    """
    logits = beta * (chosen_logps.float() - rejected_logps.float())
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1, **_) -> torch.Tensor:
    """SLiC's hinge on the summed log-prob difference: ``max(0, 1 - beta * (chosen - rejected))``, (B,)."""
    return torch.relu(1 - beta * (chosen_logps.float() - rejected_logps.float()))


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1, **_) -> torch.Tensor:
    """IPO's squared loss (Eq. 17) on mean log-probs: ``(chosen - rejected - 1 / (2 beta))^2``, (B,)."""
    return (chosen_logps.float() - rejected_logps.float() - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    **_,
) -> torch.Tensor:
    """SimPO: ``-log sigmoid(beta * (chosen - rejected) - gamma)`` on mean per-token log-probs.

    Args:
        chosen_logps, rejected_logps: (B,) mean completion log-probs (or AlphaPO rewards).
        beta: reward scale, default 0.1 (TRL); gamma: target reward margin, default 0.5.
        label_smoothing: as in :func:`cpo_loss`.

    Returns:
        (B,) per-pair losses.
    """
    logits = beta * (chosen_logps.float() - rejected_logps.float()) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def alphapo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape ``(1 - p^-alpha) / alpha`` with ``p = exp(logps)``; the log reward at alpha = 0.

    Computed as ``-expm1(-alpha * logps) / alpha``, exact for small alpha where ``1 - p^-alpha`` cancels.
    """
    logps = logps.float()
    return logps if alpha == 0 else -torch.expm1(-alpha * logps) / alpha


def alphapo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 0.1,
    gamma: float = 0.5,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    **_,
) -> torch.Tensor:
    """AlphaPO: :func:`simpo_loss` on :func:`alphapo_rewards` of the mean per-token log-probs, (B,)."""
    return simpo_loss(
        alphapo_rewards(chosen_logps, alpha), alphapo_rewards(rejected_logps, alpha), beta, gamma, label_smoothing
    )


#: ``loss_type`` name -> per-pair preference loss (B,). The method calls each with the same keyword arguments
#: (``chosen_logps``, ``rejected_logps``, ``beta``, ``gamma``, ``alpha``, ``label_smoothing``); ``**_`` takes the ones
#: a function does not use. ``CPOConfig.loss_type`` lists these names.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": cpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "alphapo": alphapo_loss,
}
#: loss types that score a completion by its mean per-token log-prob instead of the sum
LENGTH_NORMALISED = ("ipo", "simpo", "alphapo")
