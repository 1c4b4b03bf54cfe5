"""Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs — RLOO.
https://arxiv.org/abs/2402.14740

Objective, per completion i of k completions of one prompt (sequence level):
    ℓ_i = −min(ρ_i·A_i, clip(ρ_i, 1−ε_low, 1+ε_high)·A_i),  ρ_i = exp(Σ_t logπ_θ − Σ_t logπ_old),
    A_i = r_i − (Σ_{j≠i} r_j)/(k−1),  r_i = Σ_f w_f·R_f(i) − β·Σ_t (logπ_old,t − logπ_ref,t)

Deviations from the paper (each as TRL 1.16 RLOOTrainer does it):
1. The importance ratio is clipped PPO-style (the paper's REINFORCE has ratio 1: μ = 1 and on-policy).
2. The KL penalty is the k1 estimate summed over the sequence and subtracted from the reward (β = 0.05).
3. Optional: advantages standardised over the batch (`normalize_advantages`), rewards clamped
   (`reward_clip_range`); completions no reward function scores are left out of their group's baseline.
4. Completions sampled by another engine (vLLM) are reweighted by a truncated *sequence* importance weight
   (``posttrain.generation.importance_weights``; token modes are applied per sequence). TRL's RLOO has none.
"""

from __future__ import annotations

import torch


# Copied from posttrain_grpo.loss.nanstd
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def kl_penalized_rewards(rewards, old_logps, ref_logps, completion_mask, beta: float):
    """r − β·Σ_t m_t·(logπ_old,t − logπ_ref,t): the k1 KL estimate of each sequence as a reward penalty.

    Args:
        rewards: (N,); old_logps, ref_logps, completion_mask: (N, T).

    Returns:
        (rewards (N,), per_token_kl (N, T)).
    """
    per_token_kl = (old_logps - ref_logps) * completion_mask  # (N, T); k1: may be negative per token
    return rewards - beta * per_token_kl.sum(-1), per_token_kl


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False):
    """Leave-one-out advantages A_i = r_i − mean of the other scorable rewards of its group.

    Args:
        rewards: (N,), each prompt's k completions consecutive; NaN = unscorable (left out of the baseline).
        normalize: standardise the advantages over all N (mean 0, std 1, eps 1e-4).

    Returns:
        (advantages (N,), group std (N,)): NaN cases (unscorable, or alone in its group) become 0.
    """
    grouped = rewards.view(-1, num_generations)  # (P, k)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (P, 1)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (P, k)
    advantages = rewards - baseline.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    return torch.nan_to_num(advantages, nan=0.0), std


def rloo_loss(
    logps,
    old_logps,
    advantages,
    completion_mask,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    is_weights=None,
):
    """Clipped sequence-level REINFORCE for one micro-batch under the loss contract.

    Args:
        logps, old_logps: (N, T) per-token log-probs under π_θ (with grad) and the sampling policy.
        advantages: (N,) from :func:`rloo_advantages`.
        completion_mask: (N, T).
        is_weights: (N, 1) sequence importance weights for samples from another engine (vLLM), or None.

    Returns:
        (loss_sum, n_items = N sequences, stats): stats holds the clip fractions over sequences
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" and the extremes
        "clip_ratio/low_min", "clip_ratio/high_max" (one micro-batch's min / max).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    ratio = torch.exp((logps * mask).sum(-1) - (old_logps * mask).sum(-1))  # (N,)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_sequence = -torch.min(ratio * advantages, clipped * advantages)  # (N,)
    if is_weights is not None:
        per_sequence = per_sequence * is_weights.reshape(-1)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        stats = {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio/region_mean": torch.maximum(low, high).mean(),
            "clip_ratio/low_min": low.min(),
            "clip_ratio/high_max": high.max(),
        }
    return per_sequence.sum(), per_sequence.numel(), stats
