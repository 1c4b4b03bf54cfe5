"""DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models — GRPO.
https://arxiv.org/abs/2402.03300

Objective, per completion token t of completion i in a group of G completions of one prompt:
    ℓ_i,t = −min(ρ_i,t·A_i, clip(ρ_i,t, 1−ε_low, 1+ε_high)·A_i) + β·KL_i,t,
    ρ = π_θ/π_old,  A_i = (r_i − mean_group r) / (std_group r + 1e-4),  KL = k3(π_θ, π_ref)

Deviations from the paper (each as TRL 1.16 GRPOTrainer does it):
1. Token losses are aggregated by `loss_type`; the default "dapo" is DAPO's token mean over the whole step
   (2503.14476); "grpo" is the paper's per-sequence mean, "dr_grpo" Dr. GRPO's constant normaliser (2503.20783).
2. The std is Bessel-corrected and 1e-4 is added outside the square root; `scale_rewards` picks the group std
   (paper), the batch std, or none (Dr. GRPO).
3. The k3 KL is multiplied by ρ (bias correction under off-policy samples), and β defaults to 0.
4. `epsilon_high` allows an upper clip bound other than ε (DAPO's clip-higher).
"""

from __future__ import annotations

import torch


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"):
    """Group-relative advantages.

    Args:
        rewards: (N,) float, N = prompts x num_generations, each prompt's completions consecutive.
            NaN marks an unscorable completion (every reward function returned None).
        num_generations: the group size G.
        scale_rewards: "group" (divide by the group std), "batch" (by the std of all N), "none".

    Returns:
        (advantages (N,), std (N,)): unscorable completions get advantage 0; ``std`` is the scale used
        (the group std for "none", for the zero-std metric).
    """
    grouped = rewards.view(-1, num_generations)  # (P, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref): exp(ref − logp) − (ref − logp) − 1, always >= 0. (B, T)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logps, old_logps, advantages, epsilon_low: float, epsilon_high: float):
    """PPO's clipped surrogate per token: −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A).

    Args:
        logps, old_logps: (B, T) per-token log-probs under π_θ (with grad) and π_old.
        advantages: (B,) one advantage per completion.

    Returns:
        (per_token_loss (B, T), ratio (B, T)).
    """
    ratio = torch.exp(logps - old_logps)  # (B, T); exactly 1 (with grad) when old_logps = logps.detach()
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    a = advantages.unsqueeze(1)  # (B, 1)
    return -torch.min(ratio * a, clipped * a), ratio


# Each normalisation maps TRL's formula onto the loss contract: the loop divides the summed loss_sum of
# every micro-batch of a step by the summed n_items.


def grpo_normalization(per_token_loss, mask, max_completion_length):
    """Paper: mean over each sequence's tokens, then mean over sequences -> n_items = sequences."""
    per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.sum(), mask.size(0)


def bnpo_normalization(per_token_loss, mask, max_completion_length):
    """TRL's bnpo: token mean over the *micro-batch*, then mean over micro-batches -> n_items = 1."""
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0), 1


def dr_grpo_normalization(per_token_loss, mask, max_completion_length):
    """Dr. GRPO: sum / (sequences x max_completion_length), a constant -> n_items = B x L_max."""
    return (per_token_loss * mask).sum(), mask.size(0) * max_completion_length


def dapo_normalization(per_token_loss, mask, max_completion_length):
    """DAPO: sum over tokens / loss tokens of the whole step -> n_items = tokens."""
    return (per_token_loss * mask).sum(), mask.sum()


NORMALIZATIONS = {
    "grpo": grpo_normalization,
    "bnpo": bnpo_normalization,
    "dr_grpo": dr_grpo_normalization,
    "dapo": dapo_normalization,
}


def grpo_loss(
    logps,
    old_logps,
    advantages,
    completion_mask,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps=None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
):
    """The GRPO objective for one micro-batch under the loss contract.

    Args:
        logps: (B, T) per-token log-probs of the completions under π_θ (with grad).
        old_logps: (B, T) under the policy that sampled them (``logps.detach()`` when on-policy).
        advantages: (B,) from :func:`group_advantages`.
        completion_mask: (B, T) 1 on the completion tokens that count.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (see the ``*_normalization`` functions).
        beta: KL coefficient; needs ``ref_logps`` (B, T) when non-zero.
        max_completion_length: L_max, used by "dr_grpo".

    Returns:
        (loss_sum, n_items, stats): stats holds detached token means "kl" (when beta != 0) and the
        clip fractions "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" and the
        per-sequence extremes "clip_ratio/low_min", "clip_ratio/high_max".
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    per_token_loss, ratio = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    stats = {}
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio  # importance-weight the KL of off-policy tokens (TRL use_bias_correction_kl)
        per_token_loss = per_token_loss + beta * kl
        stats["kl"] = _token_mean(kl.detach(), mask)
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    loss_sum, n_items = NORMALIZATIONS[loss_type](per_token_loss, mask, max_completion_length)
    with torch.no_grad():
        a = advantages.unsqueeze(1)
        low = ((ratio < 1 - epsilon) & (a < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (a > 0)).to(mask.dtype)
        per_seq = mask.sum(-1).clamp(min=1.0)
        stats.update(
            {
                "clip_ratio/low_mean": _token_mean(low, mask),
                "clip_ratio/high_mean": _token_mean(high, mask),
                "clip_ratio/region_mean": _token_mean(torch.maximum(low, high), mask),
                "clip_ratio/low_min": ((low * mask).sum(-1) / per_seq).min(),
                "clip_ratio/high_max": ((high * mask).sum(-1) / per_seq).max(),
            }
        )
    return loss_sum, n_items, stats


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
