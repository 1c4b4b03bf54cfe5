"""Direct Preference Optimization: Your Language Model is Secretly a Reward Model (https://arxiv.org/abs/2305.18290).

Objective: minimise -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)))).

Every function here is pure: it takes per-pair tensors of shape (B,) and returns the per-pair loss (B,).
``log pi(y|x)`` is the *sum* of the completion's token log-probs. The method sums the per-pair losses
and reports the number of pairs, so the loop's step mean is the mean over every pair of the step.
``LOSSES`` maps each ``loss_type`` name to its function; :func:`dpo_loss` calls every function with the
same keyword arguments (``chosen_logratios``, ``rejected_logratios``, ``chosen_logps``, ``chosen_lengths``,
``rejected_lengths``, ``beta``, ``label_smoothing``), each takes the ones it needs and ``**_`` the rest.

Deviations from the paper (the default, ``loss_type=["sigmoid"]`` with ``label_smoothing=0``, has none):

1. ``label_smoothing`` eps turns the sigmoid loss into conservative DPO (Mitchell, 2023, "A note on DPO
   with noisy preferences"): (1 - eps) * l(z) + eps * l(-z). TRL 1.16 applies eps to ``robust`` only.
2. ``ipo`` divides each log-ratio by its completion length (tokens scored), as TRL does and as the
   IPO authors' reported results use; the paper writes unnormalised sequence log-ratios.
3. The ``sft`` term and ``rpo_alpha`` use a per-pair token mean, -sum_t log pi(y_w,t) / |y_w|, so the
   loss stays a sum over pairs. TRL 1.16 takes one token mean over all chosen tokens of the micro-batch
   and broadcasts it to every pair; the two agree when the chosen completions have equal lengths, and
   the per-pair form is the one that makes batch 8 x accumulation 1 equal batch 1 x accumulation 8.
4. ``bco_pair`` has no running-mean reward shift delta (as in TRL 1.16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


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


def hinge_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """SLiC-HF hinge loss (arXiv 2305.10425): relu(1 - beta * (r_w - r_l)); beta is 1/margin."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta: float, **_):
    """IPO (arXiv 2310.12036, Eq. 17) on length-normalised log-ratios; beta plays the paper's tau.

    ((r_w / |y_w| - r_l / |y_l|) - 1 / (2 beta))^2, lengths in scored completion tokens (clamped to >= 1).
    """
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def robust_loss(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float, **_):
    """Robust DPO (arXiv 2403.00409): unbiased loss under labels flipped with probability eps < 0.5.

    ((1 - eps) * -log sigmoid(z) - eps * -log sigmoid(-z)) / (1 - 2 eps), z = beta * (r_w - r_l).
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def bco_pair_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """BCO on pairs (arXiv 2404.04656): each response classified on its own reward, no running-mean shift.

    -log sigmoid(beta r_w) - log sigmoid(-beta r_l).
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """SPPO with hard win probabilities (arXiv 2405.00675, Eq. 4.7 with P = 1 / 0).

    (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2: pushes r_w to +1/(2 beta) and r_l to -1/(2 beta).
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def nca_pair_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """NCA for pairs (arXiv 2402.05369): absolute likelihood of y_w rises, not just the margin.

    -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l).
    """
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def apo_zero_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """APO-zero (arXiv 2408.06266, Eq. 7), for chosen answers better than the model's own.

    (1 - sigmoid(beta r_w)) + sigmoid(beta r_l): raise y_w, lower y_l.
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios, rejected_logratios, beta: float, **_):
    """APO-down (arXiv 2408.06266, Eq. 8), for chosen answers worse than the model's own.

    sigmoid(beta r_w) + (1 - sigmoid(beta (r_w - r_l))): lower y_w, and lower y_l more.
    """
    margin = beta * (chosen_logratios - rejected_logratios)
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(margin))


def sft_loss(chosen_logps, chosen_lengths, **_):
    """Negative log-likelihood of the chosen completion per token: -log pi(y_w|x) / |y_w| (deviation 3).

    The ``sft`` loss type and RPO's ``rpo_alpha`` term (arXiv 2404.19733) both use it.
    """
    return -chosen_logps / chosen_lengths.clamp(min=1)


#: ``loss_type`` name -> per-pair loss function (B,); ``DPOConfig.loss_type`` lists these names.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "sft": sft_loss,
}
#: The names of ``LOSSES`` (kept for code written against 1.0).
LOSS_TYPES = tuple(LOSSES)


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta: float = 0.1,
    loss_type: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
):
    """Per-pair loss: sum_k w_k * loss_k (+ rpo_alpha * sft_loss), each loss_k one of the functions above.

    Args:
        chosen_logps, rejected_logps: (B,) summed completion log-probs under the policy (with grad).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (zeros when reference-free).
        chosen_lengths, rejected_lengths: (B,) completion tokens scored, for ``ipo`` and ``sft``.
        beta, label_smoothing, rpo_alpha: see ``DPOConfig``.
        loss_type: names from ``LOSSES``; loss_weights: one weight each (default 1.0 each).

    Returns:
        (B,) tensor of per-pair losses.
    """
    inputs = {
        "chosen_logratios": chosen_logps - ref_chosen_logps,  # (B,)
        "rejected_logratios": rejected_logps - ref_rejected_logps,  # (B,)
        "chosen_logps": chosen_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "beta": beta,
        "label_smoothing": label_smoothing,
    }
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_type)
    loss = torch.zeros_like(chosen_logps)
    for name, weight in zip(loss_type, weights, strict=True):
        if name not in LOSSES:
            raise ValueError(f"unknown loss_type {name!r}; choose from {', '.join(LOSSES)}")
        loss = loss + weight * LOSSES[name](**inputs)
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * sft_loss(chosen_logps, chosen_lengths)
    return loss
