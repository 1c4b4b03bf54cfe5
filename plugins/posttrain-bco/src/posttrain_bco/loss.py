"""Binary Classifier Optimization for Large Language Model Alignment (Jung et al., 2024).

https://arxiv.org/abs/2404.04656

Objective: l = -log sigmoid(s * (r - delta)), r = beta * log(pi(y|x) / pi_ref(y|x)), s = +1 (desirable) or -1.
delta, the reward shift, is the running mean of the implicit rewards r.

Deviations from the paper:
1. delta is the count-weighted running mean of every implicit reward seen in training so far, updated with each
   micro-batch (all processes together) *before* that micro-batch's loss, so the current rewards are part of it.
   This is exactly what TRL's last BCO trainer did (its ``RunningMoments``); the paper describes delta as a moving
   average of the rewards. Evaluation reads delta and never updates it.
2. Underlying distribution matching (UDM: density-ratio weights on undesirable rows, paper section 4) is not
   implemented; ``udm: true`` is a configuration error.
3. Normalisation: the loss is the sum over examples divided by the number of examples of the whole optimizer step
   (TRL: a mean per micro-batch, then divided by the accumulation steps). Equal for equal-sized micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * log(pi/pi_ref) of each completion.

    Args:
        logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference model.
        beta: reward scale (paper: 0.1).

    Returns:
        (B,) implicit rewards.
    """
    return beta * (logps - ref_logps)


def bco_loss(rewards: torch.Tensor, labels: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """Per-example binary cross-entropy of the shifted reward.

    Args:
        rewards: (B,) implicit rewards.
        labels: (B,) bool, true for desirable (thumbs-up) completions.
        delta: the reward shift, a float or 0-dim tensor (no gradient flows into it).

    Returns:
        (B,) losses: -log sigmoid(r - delta) for desirable rows, -log sigmoid(-(r - delta)) for undesirable ones.
    """
    shifted = rewards - delta  # (B,)
    # desirable rows should have r > delta, undesirable ones r < delta: flip the sign for the latter
    sign = labels.to(shifted.dtype) * 2 - 1
    return -F.logsigmoid(sign * shifted)


def update_running_mean(mean: float, count: float, batch_sum: float, batch_count: float) -> tuple[float, float]:
    """Fold a batch of rewards into a count-weighted running mean.

    Args:
        mean: the running mean so far (0.0 before the first update).
        count: how many rewards it averages (0.0 before the first update).
        batch_sum: sum of the new rewards.
        batch_count: how many new rewards.

    Returns:
        (new_mean, new_count); the mean of every reward seen, in any grouping.
    """
    if batch_count <= 0:
        return mean, count
    total = count + batch_count
    return mean + (batch_sum / batch_count - mean) * batch_count / total, total
