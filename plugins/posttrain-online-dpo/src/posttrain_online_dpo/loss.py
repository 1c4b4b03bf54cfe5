"""Direct Language Model Alignment from Online AI Feedback — online DPO (Guo et al., 2024).
https://arxiv.org/abs/2402.04792

Objective, for a prompt x whose two samples y_1, y_2 ~ π_θ(·|x), drawn from the current policy at every step,
an annotator ranks y_w ≻ y_l:
    ℓ = −log σ(β·h),   h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))
where log π(y|x) is the sum of the completion's token log-probs (EOS included) at temperature 1.

Every function here is pure. The method sums the per-pair losses and reports the number of ranked pairs,
so the loop's step mean is the mean over every ranked pair of the step.

Deviations from the paper (1-3 as TRL 1.16's experimental OnlineDPOTrainer does them):
1. The annotator is a pairwise judge, or reward functions (a reward model among them) whose higher score
   wins; the paper prompts an LLM ("AI feedback"). With scores, a tie goes to the first sample.
2. ``ipo`` is IPO (arXiv 2310.12036, Eq. 17) on the same unnormalised sequence log-ratios, (h − 1/(2β))²;
   posttrain-dpo's ``ipo`` divides each log-ratio by its length, as TRL's offline DPO does.
3. ``missing_eos_penalty`` lowers the score of a completion that reached max_completion_length without EOS.
4. A pair the annotator cannot rank (a sample no reward function scores, or a judge with no preference)
   carries no loss and is not counted; TRL counts an unscored sample as reward 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Which sample of each pair wins on scores: the higher one, the first on a tie.

    Args:
        scores: (2P,) each prompt's two samples consecutive; NaN = unscored.

    Returns:
        winner (P,) float: 0.0 (first wins), 1.0 (second wins) or NaN (a score is missing: unranked).
    """
    pairs = scores.view(-1, 2)  # (P, 2)
    winner = (pairs[:, 1] > pairs[:, 0]).float()  # `>`: a tie keeps the first sample as chosen (TRL: first >= second)
    return winner.masked_fill(torch.isnan(pairs).any(dim=1), float("nan"))


def pair_rows(winner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the chosen and the rejected sample of each pair among the 2P samples (pairs consecutive).

    Args:
        winner: (P,) 0.0, 1.0 or NaN from :func:`preference_from_scores` or a judge; an unranked pair keeps
            its order (it carries no loss).

    Returns:
        (chosen (P,), rejected (P,)) long tensors.
    """
    second = torch.nan_to_num(winner, nan=0.0).long()  # (P,)
    first_row = 2 * torch.arange(len(winner), device=winner.device)
    return first_row + second, first_row + 1 - second


# Copied from posttrain_dpo.loss.dpo_sigmoid_loss
def dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float = 0.0, **_):
    """DPO's Bradley-Terry loss, -log sigmoid(beta * (r_w - r_l)), with optional label smoothing (cDPO).

    Args:
        chosen_logratios: (B,) log pi(y_w|x) - log pi_ref(y_w|x).
        rejected_logratios: (B,) the same for y_l.
        beta: float, deviation from the reference (paper: 0.1 to 0.5).
        label_smoothing: float in [0, 0.5), probability that a label is flipped; 0 is the paper.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(chosen_logratios, rejected_logratios, beta: float):
    """IPO (arXiv 2310.12036, Eq. 17) on sequence log-ratios, beta playing the paper's tau (deviation 2).

    (h - 1 / (2 beta))^2 with h = r_w - r_l: pulls the log-ratio margin to 1/(2 beta) instead of to infinity.

    Args:
        chosen_logratios, rejected_logratios: (B,) as in :func:`dpo_sigmoid_loss`.
    """
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


#: loss_type -> per-pair loss(chosen_logratios, rejected_logratios, beta).
LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss}


def online_dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    ranked,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
):
    """One micro-batch under the loss contract: the sum over ranked pairs and their count.

    Args:
        chosen_logps, rejected_logps: (P,) summed completion log-probs under the policy (with grad).
        ref_chosen_logps, ref_rejected_logps: (P,) the same under the reference.
        ranked: (P,) bool, False for pairs the annotator could not rank (deviation 4).
        beta: float > 0; loss_type: a key of :data:`LOSSES`.

    Returns:
        (loss_sum, n_items = ranked pairs, per_pair (P,) with 0 for unranked pairs).
    """
    per_pair = LOSSES[loss_type](chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps, beta)
    per_pair = torch.where(ranked, per_pair, torch.zeros_like(per_pair))  # `where`: no NaN/inf leaks through 0 * x
    return per_pair.sum(), ranked.sum(), per_pair


def online_dpo_metrics(logps, ref_logps, ranked, truncated, beta: float, scores=None) -> dict:
    """TRL's online DPO metrics of one micro-batch as (numerator, denominator) pairs, so that means over a logging
    window are exact: pair metrics over ranked pairs, sample metrics over every sample.

    Args:
        logps, ref_logps: (2P,) summed log-probs of the samples, ordered [chosen; rejected] (no grad).
        ranked: (P,) bool; truncated: (2P,) bool, no EOS; beta: float.
        scores: (2P,) ranking scores after missing_eos_penalty (NaN = unscored), or None when a judge ranked.

    Returns:
        name -> (numerator, denominator). ``objective/kl`` is the sequence log-ratio log π/π_ref over completion
        tokens (TRL's sums every position, padding after EOS included); ``objective/entropy`` is −log π(y|x).
    """
    n_pairs, n_samples = ranked.sum(), len(logps)
    kl = logps - ref_logps  # (2P,)
    chosen_rewards, rejected_rewards = (beta * kl).chunk(2)  # the implicit rewards β log π/π_ref
    chosen_logps, rejected_logps = logps.chunk(2)

    def pair_mean(x):
        return torch.where(ranked, x.float(), 0.0).sum(), n_pairs

    stats = {
        "rewards/chosen": pair_mean(chosen_rewards),
        "rewards/rejected": pair_mean(rejected_rewards),
        "rewards/margins": pair_mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": pair_mean(chosen_rewards > rejected_rewards),
        "logps/chosen": pair_mean(chosen_logps),
        "logps/rejected": pair_mean(rejected_logps),
        "objective/kl": (kl.sum(), n_samples),
        "objective/entropy": (-logps.sum(), n_samples),
        "objective/non_score_reward": (-beta * kl.sum(), n_samples),
        "val/contain_eos_token": ((~truncated).sum(), n_samples),
        "pairs/ranked_fraction": (n_pairs, len(ranked)),
    }
    if scores is not None:
        scored = (~torch.isnan(scores)).sum()
        chosen_scores, rejected_scores = scores.chunk(2)
        stats["objective/scores"] = (scores.nansum(), scored)
        stats["objective/scores_margin"] = pair_mean(chosen_scores - rejected_scores)
        stats["objective/rlhf_reward"] = ((scores - beta * kl).nansum(), scored)  # score + non-score reward
        stats["pairs/tie_fraction"] = pair_mean(chosen_scores == rejected_scores)
    return stats
