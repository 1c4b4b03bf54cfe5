"""DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models — GRPO.
https://arxiv.org/abs/2402.03300

Objective, per completion token t of completion i in a group of G completions of one prompt:
    ℓ_i,t = −min(ρ_i,t·A_i, clip(ρ_i,t, 1−ε_low, 1+ε_high)·A_i) + β·KL_i,t,
    ρ = π_θ/π_old,  A_i = (r_i − mean_group r) / (std_group r + 1e-4),  KL = k3(π_θ, π_ref)

The family (``loss_type``; each as TRL 1.16 GRPOTrainer computes it):
- ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``: the clipped surrogate above, aggregated four ways (see the
  ``*_normalization`` functions); ``dapo`` (2503.14476) is the default, ``dr_grpo`` is 2503.20783.
- ``cispo`` (MiniMax-M1, 2506.13585; ScaleRL 2510.13786): −sg(min(ρ, ε_max))·A·log π_θ, token-summed like dapo;
  ``epsilon_high`` is ε_max (recommended 5.0).
- ``sapo`` (2511.20347): −(4/τ)·σ(τ·(ρ−1))·A with τ = ``sapo_temperature_pos`` for A > 0 and ``_neg`` otherwise,
  aggregated like grpo.
- ``importance_sampling_level="sequence"`` (GSPO, 2507.18071): ρ_i = exp(mean_t log(π_θ/π_old)), one ratio per
  completion.

Deviations from the paper (each as TRL 1.16 does it):
1. The std is Bessel-corrected and 1e-4 is added outside the square root; ``scale_rewards`` picks the group std
   (paper), the batch std, or none (Dr. GRPO).
2. The k3 KL is multiplied by ρ (bias correction under off-policy samples) when ``use_bias_correction_kl``, and
   β defaults to 0.
3. ``epsilon_high`` allows an upper clip bound other than ε (DAPO's clip-higher); ``delta`` adds INTELLECT-2's
   upper bound on the unclipped term.
4. Completions sampled by another engine (vLLM) are reweighted by the truncated importance weight of
   ``posttrain.generation.importance_weights`` before the KL is added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SurrogateFn = Callable[..., torch.Tensor]


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


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """ρ = π_θ / π_old per token (B, T), or per sequence (B, 1) as exp of the mean token log-ratio (GSPO)."""
    log_ratio = logps - old_logps  # exactly 0 (with grad) when old_logps = logps.detach()
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


# -- per-token surrogates: (ratio, advantages (B, 1), logps) -> per-token loss ---------------------------------


def clipped_surrogate(ratio, advantages, logps, *, epsilon_low, epsilon_high, delta=None, **_):
    """PPO's clipped surrogate −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A); ``delta`` caps ρ in the first term."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    return -torch.min(unclipped * advantages, clipped * advantages)


def cispo_surrogate(ratio, advantages, logps, *, epsilon_high, **_):
    """CISPO: −sg(min(ρ, ε_max))·A·log π_θ — the weight is clipped and detached, the gradient flows through log π."""
    return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logps


def sapo_surrogate(ratio, advantages, logps, *, sapo_temperature_pos, sapo_temperature_neg, **_):
    """SAPO: −(4/τ)·σ(τ·(ρ − 1))·A, a smooth trust region; τ depends on the sign of A."""
    tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages


# -- aggregation under the loss contract: the loop divides the summed loss_sum of a step by the summed n_items --


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


#: loss_type -> (per-token surrogate, aggregation)
LOSSES: dict[str, tuple[SurrogateFn, Callable]] = {
    "grpo": (clipped_surrogate, grpo_normalization),
    "bnpo": (clipped_surrogate, bnpo_normalization),
    "dr_grpo": (clipped_surrogate, dr_grpo_normalization),
    "dapo": (clipped_surrogate, dapo_normalization),
    "cispo": (cispo_surrogate, dapo_normalization),
    "sapo": (sapo_surrogate, grpo_normalization),
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
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    beta: float = 0.0,
    ref_logps=None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    is_weights=None,
):
    """The GRPO-family objective for one micro-batch under the loss contract.

    Args:
        logps: (B, T) per-token log-probs of the completions under π_θ (with grad).
        old_logps: (B, T) under the policy that sampled them (``logps.detach()`` when on-policy).
        advantages: (B,) from :func:`group_advantages`.
        completion_mask: (B, T) 1 on the completion tokens that count.
        loss_type: a key of :data:`LOSSES`.
        importance_sampling_level: "token" or "sequence" (GSPO).
        beta: KL coefficient; needs ``ref_logps`` (B, T) when non-zero.
        max_completion_length: L_max, used by "dr_grpo".
        is_weights: (B, T) or (B, 1) truncated importance weights for samples from another engine, or None.

    Returns:
        (loss_sum, n_items, stats): stats holds detached token means "kl" (when beta != 0), the clip fractions
        of the clipped losses (TRL's "clip_ratio/*") or "cispo_clip_ratio".
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSSES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    a = advantages.unsqueeze(1)  # (B, 1)
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)  # (B, T) or (B, 1)
    surrogate, normalization = LOSSES[loss_type]
    per_token_loss = surrogate(
        ratio,
        a,
        logps,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights
    stats = {}
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio  # importance-weight the KL of off-policy tokens (TRL use_bias_correction_kl)
        per_token_loss = per_token_loss + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    loss_sum, n_items = normalization(per_token_loss.expand_as(mask), mask, max_completion_length)
    stats.update(_clip_stats(loss_type, ratio.detach(), a, mask, epsilon, epsilon_high))
    return loss_sum, n_items, stats


def _clip_stats(loss_type, ratio, a, mask, epsilon_low, epsilon_high) -> dict[str, torch.Tensor]:
    """TRL's clipping metrics: how often the ratio left the trust region, per token (or per sequence)."""
    if loss_type == "cispo":
        return {"cispo_clip_ratio": _masked_mean(((ratio > epsilon_high) & (a > 0)).to(mask.dtype), mask)}
    if loss_type == "sapo":
        return {}
    low = ((ratio < 1 - epsilon_low) & (a < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon_high) & (a > 0)).to(mask.dtype)
    per_seq = (
        (lambda x: x.squeeze(1)) if ratio.size(1) == 1 else (lambda x: (x * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    )
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
        "clip_ratio/low_min": per_seq(low).min(),
        "clip_ratio/high_max": per_seq(high).max(),
    }


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of (B, T) values, or sequence mean of (B, 1) values, over the masked positions."""
    if x.size(1) == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)
