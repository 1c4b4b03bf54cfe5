"""On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (GKD)
https://arxiv.org/abs/2306.13649

Objective, per completion token t with p_s, p_t the student's and teacher's next-token distributions at temperature T:
    JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = (1 - beta) * p_s + beta * p_t,
with beta = 0 taken as the forward KL(p_t || p_s) and beta = 1 as the reverse KL(p_s || p_t) (TRL 1.16's
convention; the interpolated formula itself vanishes at both ends).
Loss = sum over the completion tokens of the step / number of completion tokens of the step.

Deviations from the paper:
1. beta = 0 / 1 are the forward / reverse KL, as in TRL 1.16, not the (zero) limit of JSD_beta.
2. Both distributions are taken at the sampling temperature, as in TRL's DistillationTrainer (TRL's GKDTrainer
   uses the temperature for sampling only).
3. On-policy batches are chosen per micro-batch with probability ``lmbda`` from a generator seeded by
   (seed, step, micro-batch), so a resumed run makes the same choices; the paper draws once per step.
4. A teacher with a larger (padded) vocabulary is cut to the student's vocabulary before the softmax, as TRL does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalised Jensen-Shannon divergence between student and teacher.

    Args:
        student_logits: (B, T, V) student logits (with grad).
        teacher_logits: (B, T, V) teacher logits (no grad needed).
        beta: in [0, 1]; 0 = KL(teacher || student), 1 = KL(student || teacher), else JSD_beta.
        temperature: both logits are divided by it before the softmax.

    Returns:
        (B, T) float32 divergence per position (mask it yourself).
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    # log m = log((1 - beta) p_s + beta p_t), stably in log space
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    kl_teacher = (log_pt.exp() * (log_pt - log_m)).sum(-1)  # KL(p_t || m)
    kl_student = (log_ps.exp() * (log_ps - log_m)).sum(-1)  # KL(p_s || m)
    return beta * kl_teacher + (1 - beta) * kl_student


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked positions where student and teacher rank the same token first.

    Args:
        student_logits, teacher_logits: (B, T, V).
        mask: (B, T), 1 for completion tokens.

    Returns:
        0-dim float tensor in [0, 1] (0 when the mask is empty).
    """
    same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & mask.bool()  # (B, T)
    return same.sum().float() / mask.sum().clamp(min=1)
