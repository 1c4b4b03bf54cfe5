"""ORPO: Monolithic Preference Optimization without Reference Model — https://arxiv.org/abs/2403.07691

Objective, per pair (x, y_w, y_l):  L = NLL(y_w | x) - lambda * log sigmoid( log odds(y_w|x) - log odds(y_l|x) ),
with odds(y|x) = P(y|x) / (1 - P(y|x)) and P(y|x) = exp(mean_t log p(y_t | x, y_<t)) (Eq. 4-7; lambda = ``beta``).

Deviations from the paper and from TRL 1.16 (the parity reference):
1. The NLL term is, by default, the token mean over prompt *and* chosen completion tokens, as TRL 1.16
   computes it; ``nll_on_prompt=false`` restricts it to the completion (the paper's wording).
2. Normalisation: each pair's NLL is the mean over that pair's own tokens and the loss is averaged over
   pairs (the paper's expectation over pairs). TRL instead takes one token mean over every chosen
   sequence of the micro-batch; the two agree exactly when the chosen sequences of a micro-batch have
   equal token counts, and otherwise differ by a length weighting (TRL weights pair i by T_i / mean T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    # near 0 log1p(-exp(x)) cancels; far below, -expm1(x) rounds to 1 and loses the tail
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log( odds(y_w) / odds(y_l) ) from token-mean log-probs, in log space (Eq. 4 and 7).

    log odds(y) = log P - log(1 - P) = logp - log1mexp(logp).

    Args:
        chosen_logps, rejected_logps: (B,) mean per-token log-probs of the completions (< 0).

    Returns:
        (B,) float32 log odds ratios.
    """
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()  # float32: log1mexp near 0
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss(
    chosen_nll: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss: ``NLL + beta * (-log sigmoid(log odds ratio))`` (Eq. 6).

    Args:
        chosen_nll: (B,) token-mean negative log-likelihood of each chosen sequence.
        chosen_logps, rejected_logps: (B,) token-mean completion log-probs.
        beta: odds-ratio weight (lambda in the paper), default 0.1.

    Returns:
        (losses (B,), log_odds (B,)): sum ``losses`` for the loss contract; ``log_odds`` is for metrics.
    """
    log_odds = log_odds_ratio(chosen_logps, rejected_logps)
    return chosen_nll - beta * F.logsigmoid(log_odds), log_odds
