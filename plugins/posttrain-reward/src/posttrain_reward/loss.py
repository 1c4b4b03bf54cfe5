"""Training language models to follow instructions with human feedback (InstructGPT), https://arxiv.org/abs/2203.02155

Objective, per pair: loss = -log σ(r(x, y_chosen) - r(x, y_rejected) - margin) + c · (r(x, y_chosen) + r(x, y_rejected))²,
where r is the scalar a sequence-classification head gives the last real token of prompt + response
(Bradley–Terry preference model, the paper's Eq. 1 with margin = 0 and c = 0).

Deviations from the paper:
1. Every comparison is its own item. The paper puts all K·(K-1)/2 comparisons of one prompt into a single batch
   element to avoid overfitting; here a dataset row is one pair, and a prompt's pairs may land in different batches.
2. Optional ``margin`` per pair (Llama 2, https://arxiv.org/abs/2307.09288, Eq. 2), subtracted inside the sigmoid as
   TRL does. Used only when the dataset has a ``margin`` column.
3. Optional centering term c · (r_chosen + r_rejected)² (Eisenstein et al., https://arxiv.org/abs/2312.09244, Eq. 2),
   which pulls rewards towards zero mean. Off by default (``center_rewards_coefficient=None``; 0.01 is suggested).

Normalisation: the functions return one loss per pair; the method sums them and reports the number of pairs, so the
loop's step loss is the mean over all pairs of the optimizer step, the same as TRL's per-batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from posttrain import Metric


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Per-pair reward-model loss.

    Args:
        chosen_rewards: (B,) scalar reward of each chosen sequence.
        rejected_rewards: (B,) scalar reward of each rejected sequence.
        margin: (B,) optional required gap; the loss is ``-log σ(r_c - r_r - margin)``, so a pair is only "won"
            once the chosen reward beats the rejected one by ``margin``. Default None (no margin).
        center_rewards_coefficient: optional c >= 0 of the centering term ``c · (r_c + r_r)²``. TRL writes it as
            ``c · mean((r_c + r_r)²)`` next to the mean Bradley–Terry term, which is the mean of these per-pair sums.
            Default None (off).

    Returns:
        (B,) float32 tensor of per-pair losses; sum it and divide by B for TRL's batch loss.
    """
    # float32: under bf16 autocast the head's output is bf16, and logsigmoid of a small difference loses digits
    chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
    logits = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        logits = logits - margin.to(logits)
    losses = -F.logsigmoid(logits)  # (B,), log 2 when both rewards are equal and margin is 0
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


@torch.no_grad()
def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, Metric | torch.Tensor]:
    """TRL 1.16's reward-model metrics for one micro-batch, plus the mean reward of each side, as the loop logs them.

    Means are :class:`posttrain.Metric` ratios (a sum and its count), so the logged value is the mean over every
    pair of the logging window (and of the whole evaluation set), however pairs fall into micro-batches.
    ``min_reward`` / ``max_reward`` stay this micro-batch's extremes, which the loop averages, as TRL does.

    Args:
        chosen_rewards, rejected_rewards: (B,) rewards.

    Returns:
        ``accuracy`` (fraction of pairs with r_c > r_r; ties count as wrong), ``margin`` (mean r_c - r_r, without the
        dataset margin), ``mean_reward`` over all 2B rewards, ``rewards/chosen`` / ``rewards/rejected`` (means), each
        a ``Metric.ratio`` of float32 0-dim tensors; ``min_reward`` / ``max_reward`` over all 2B rewards, 0-dim float32
        tensors.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
    every = torch.cat([chosen_rewards, rejected_rewards])  # (2B,)
    pairs = chosen_rewards.numel()
    return {
        "accuracy": Metric.ratio((chosen_rewards > rejected_rewards).float().sum(), pairs),
        "margin": Metric.ratio((chosen_rewards - rejected_rewards).sum(), pairs),
        "min_reward": every.min(),
        "mean_reward": Metric.ratio(every.sum(), every.numel()),
        "max_reward": every.max(),
        "rewards/chosen": Metric.ratio(chosen_rewards.sum(), pairs),
        "rewards/rejected": Metric.ratio(rejected_rewards.sum(), pairs),
    }
