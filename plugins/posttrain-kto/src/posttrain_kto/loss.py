"""KTO: Model Alignment as Prospect Theoretic Optimization — https://arxiv.org/abs/2402.01306

Objective, per example with implied reward r = log pi(y|x) - log pi_ref(y|x) (completion tokens summed):
    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))      undesirable:   lambda_U * (1 - sigmoid(beta * (z0 - r)))
with the reference point z0 = max(0, mean_i [log pi(y_j|x_i) - log pi_ref(y_j|x_i)]) over mismatched pairs, detached.

Deviations from the paper:
1. The mismatched pairs are built inside each micro-batch after the loop's shuffle: with rows in dataset order, row i's
   prompt goes with the completion of the previous row (the last row's for the first), so z0 comes from the same
   completions the micro-batch scores. TRL also estimates z0 per micro-batch (averaged over processes, as here), but
   fixes the pairs in dataset order and therefore trains without shuffling. With ``precompute_ref_log_probs`` each
   row's mismatched completion is fixed before training (the previous row's), because its reference log-prob is.
   Under gradient accumulation every micro-batch has its own z0, so batch 8 x 1 and 4 x 2 differ slightly.
2. ``apo_zero_unpaired`` (unpaired APO-zero, https://arxiv.org/abs/2408.06266) is offered as in TRL; it has no z0.
3. The loss is the weighted sum over examples divided by the number of examples of the whole optimizer step
   (TRL: the mean per micro-batch, then averaged over micro-batches; equal when micro-batches have equal sizes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 from mismatched (prompt, completion) pairs.

    Args:
        kl_logps: (B,) policy log-probs of mismatched pairs, completion tokens summed.
        ref_kl_logps: (B,) the same under the reference model.

    Returns:
        0-dim tensor ``max(0, mean(kl_logps - ref_kl_logps))``, detached: z0 is a baseline, not a target
        (the paper back-propagates nothing through it).
    """
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (paper Eq. 7-8) and implied rewards.

    Args:
        logps: (B,) policy log-probs of the completions (summed over completion tokens).
        ref_logps: (B,) reference log-probs of the same completions.
        labels: (B,) bool, True for desirable examples.
        kl: 0-dim reference point z0 (from :func:`kl_reference_point`, or 0).
        beta: reward temperature (paper 0.1).
        desirable_weight, undesirable_weight: lambda_D and lambda_U.

    Returns:
        (losses (B,) weighted per-example losses, rewards (B,) ``beta * (logps - ref_logps)`` detached).
    """
    logratios = logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - F.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - F.sigmoid(beta * (kl - logratios)))
    losses = torch.where(labels.bool(), desirable, undesirable)
    return losses, beta * logratios.detach()


def apo_zero_unpaired_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpaired APO-zero: push desirable rewards up and undesirable rewards down, with no reference point.

    desirable ``lambda_D * (1 - sigmoid(beta*r))``, undesirable ``lambda_U * sigmoid(beta*r)``.
    Arguments and returns as :func:`kto_loss`; a ``kl`` keyword is accepted and unused (there is no z0).
    """
    logratios = logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - F.sigmoid(beta * logratios))
    undesirable = undesirable_weight * F.sigmoid(beta * logratios)
    losses = torch.where(labels.bool(), desirable, undesirable)
    return losses, beta * logratios.detach()


#: ``loss_type`` name -> per-example loss function, returning (losses (B,), rewards (B,)). The method calls each with
#: the same keyword arguments (``logps``, ``ref_logps``, ``labels``, ``kl``, ``beta``, ``desirable_weight``,
#: ``undesirable_weight``); ``**_`` takes the ones a function does not use. ``KTOConfig.loss_type`` lists these names.
LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "kto": kto_loss,
    "apo_zero_unpaired": apo_zero_unpaired_loss,
}
