"""ORPO loss against hand-computed values: the pure functions, then the method's wiring on a bigram stub model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from posttrain import Metric, TrainContext
from posttrain.config import build_config
from posttrain.testing._rounding import rounding_tolerance
from posttrain_orpo import ORPO, ORPOConfig, log1mexp, log_odds_ratio, orpo_loss
from posttrain_orpo.data import collate_pairs

# Tolerances. Hand values are exact (math in float64) or printed to 7 digits (off by <= 5e-7). Ours are float32:
# a loss function is <= 10 rounded operations on numbers of size <= 3, off by <= 4.5e-6 (ATOL); the method's loss on
# the bigram stub is <= 50 (METHOD_ATOL, 1e-5); the same loss grouped two ways (padded together, alone) may round
# apart by twice that (GROUPING_TOL). See posttrain.testing._rounding.rounding_tolerance. A formula error (a missing
# beta, a sum for a mean, a padding token scored) moves them by 1e-2 or more.
ATOL = 5e-7 + rounding_tolerance(3.0, 10, sides=1)
METHOD_ATOL = 5e-7 + rounding_tolerance(3.0, 50, sides=1)
GROUPING_TOL = rounding_tolerance(4.0, 50)


def test_orpo_loss_hand_computed():
    """Probabilities chosen so every odds is a simple fraction; sigmoid(log r) = r / (1 + r).

    Pair 1: P_w = 1/2 (odds 1), P_l = 1/5 (odds 1/4): odds ratio 4, log sigmoid(log 4) = log(4/5);
            NLL 1.5, so loss = 1.5 - 0.1 * log(0.8) = 1.5 + 0.1 * 0.2231436 = 1.5223144.
    Pair 2: P_w = 1/4 (odds 1/3), P_l = 1/2 (odds 1): ratio 1/3, log sigmoid(log 1/3) = log(1/4);
            NLL 2.0, so loss = 2.0 - 0.1 * log(0.25) = 2.0 + 0.1 * 1.3862944 = 2.1386294.
    """
    chosen = torch.log(torch.tensor([0.5, 0.25]))
    rejected = torch.log(torch.tensor([0.2, 0.5]))
    losses, log_odds = orpo_loss(torch.tensor([1.5, 2.0]), chosen, rejected, beta=0.1)
    assert log_odds.tolist() == pytest.approx([math.log(4), math.log(1 / 3)], abs=ATOL)
    assert losses.tolist() == pytest.approx([1.5223144, 2.1386294], abs=ATOL)


def test_orpo_loss_limits():
    """beta = 0 leaves the NLL alone; equal likelihoods give log odds 0 and a penalty of beta * log 2."""
    chosen = torch.tensor([-0.3, -2.0])
    nll = torch.tensor([0.7, 1.1])
    losses, _ = orpo_loss(nll, chosen, torch.tensor([-1.0, -0.1]), beta=0.0)
    assert torch.equal(losses, nll)  # nll - 0 * x: exact
    losses, log_odds = orpo_loss(nll, chosen, chosen.clone(), beta=0.5)
    assert log_odds.tolist() == [0.0, 0.0]  # the same inputs on both sides: exact
    assert losses.tolist() == pytest.approx((nll + 0.5 * math.log(2)).tolist(), abs=ATOL)


def test_log1mexp_is_accurate_on_both_branches():
    """float32 result against float64 log1p(-exp(x)): near 0, where the float32 form would cancel, and far below."""
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.6931, -0.7, -5.0, -40.0])
    expected = torch.log1p(-torch.exp(x.double()))
    # an accurate float32 log1mexp is a few roundings (<= 8) off, relatively: 1.4e-6; the cancelling
    # log(1 - exp(x)) is off by up to 100% near 0
    assert torch.allclose(log1mexp(x).double(), expected, rtol=rounding_tolerance(1.0, 8, sides=1), atol=0)
    assert torch.isfinite(log_odds_ratio(torch.tensor([-1e-7]), torch.tensor([-60.0]))).all()


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.5], requires_grad=True)
    losses, _ = orpo_loss(torch.zeros(1), chosen, rejected, beta=1.0)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# -- the method's loss on a model whose log-probs are known exactly -------------------------------------

# Token ids: 0 pad, 1 prompt, 2 "good", 3 "bad". Row a = P(next | current = a).
BIGRAM = torch.tensor(
    [
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.2, 0.4, 0.3],
        [0.1, 0.2, 0.5, 0.2],
        [0.1, 0.1, 0.4, 0.4],
    ]
)


class BigramModel(torch.nn.Module):
    """Next-token distribution depends on the current token only: logits = log BIGRAM[input_ids]."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.log(BIGRAM)[input_ids])


def _ctx(**fields):
    return TrainContext(config=build_config(ORPOConfig, fields), tokenizer=SimpleNamespace(pad_token_id=0))


def _loss(rows, **fields):
    method, ctx = ORPO(), _ctx(**fields)
    return method.loss(BigramModel(), collate_pairs(rows, pad_token_id=0), ctx)


def _logged(*outputs, name):
    """What the loop logs for metric ``name`` over these micro-batches: a pair mean, sum over count."""
    metrics = [out.metrics[name] for out in outputs]
    assert all(isinstance(m, Metric) and m.kind == "ratio" for m in metrics), name
    return sum(float(m.value) for m in metrics) / sum(float(m.denominator) for m in metrics)


PAIR_1 = {"prompt_ids": [1, 1], "chosen_ids": [2, 2], "rejected_ids": [3, 3]}
PAIR_2 = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 3, 2]}


def _expected_pair_1(beta: float, nll_on_prompt: bool) -> float:
    """Pair 1 by hand, from BIGRAM.

    chosen   1 1 2 2: scored tokens P(1|1)=0.2, P(2|1)=0.4, P(2|2)=0.5; completion = the last two.
    rejected 1 1 3 3: completion P(3|1)=0.3, P(3|3)=0.4.
    P_w = exp(mean log) = sqrt(0.4*0.5) = sqrt(0.2); P_l = sqrt(0.12).
    NLL = -(log 0.2 + log 0.4 + log 0.5)/3 = -log(0.04)/3 = 1.0729586 (with prompt tokens),
          -log(0.2)/2 = 0.8047190 (completion only).
    loss = NLL - beta * log( r / (1 + r) ),  r = odds_w / odds_l,  odds = P / (1 - P).
    """
    p_w, p_l = math.sqrt(0.2), math.sqrt(0.12)
    r = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    nll = -math.log(0.04) / 3 if nll_on_prompt else -math.log(0.2) / 2
    return nll - beta * math.log(r / (1 + r))


def _expected_pair_2(beta: float) -> float:
    """chosen 1 2: P(2|1)=0.4, P_w = 0.4, NLL = -log 0.4 (the prompt token is never predicted).

    rejected 1 3 3 2: P(3|1)=0.3, P(3|3)=0.4, P(2|3)=0.4, P_l = (0.3*0.4*0.4)^(1/3) = 0.048^(1/3).
    """
    p_w, p_l = 0.4, 0.048 ** (1 / 3)
    r = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    return -math.log(0.4) - beta * math.log(r / (1 + r))


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_method_loss_on_known_log_probs(nll_on_prompt):
    out = _loss([PAIR_1], beta=0.1, nll_on_prompt=nll_on_prompt)
    assert out.n_items == 1
    assert out.loss_sum.item() == pytest.approx(_expected_pair_1(0.1, nll_on_prompt), abs=METHOD_ATOL)
    assert _logged(out, name="logps/chosen") == pytest.approx(0.5 * math.log(0.2), abs=ATOL)
    assert _logged(out, name="rewards/rejected") == pytest.approx(0.1 * 0.5 * math.log(0.12), abs=ATOL)


def test_method_loss_sums_pairs_and_ignores_padding():
    """Two pairs of different lengths: loss_sum is the sum of both hand values, n_items = 2 pairs."""
    out = _loss([PAIR_1, PAIR_2], beta=0.2)
    assert out.n_items == 2
    expected = _expected_pair_1(0.2, True) + _expected_pair_2(0.2)
    assert out.loss_sum.item() == pytest.approx(expected, abs=METHOD_ATOL)
    apart = _loss([PAIR_1], beta=0.2).loss_sum + _loss([PAIR_2], beta=0.2).loss_sum
    assert out.loss_sum.item() == pytest.approx(apart.item(), abs=GROUPING_TOL)
    assert _logged(out, name="rewards/accuracies") == 1.0
    assert set(out.metrics) >= {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins", "logits/chosen"}


def test_metrics_are_pair_means_that_pool_over_micro_batches():
    """Each metric is a sum over pairs with its pair count, so 1 + 2 pairs log what the 3 together do."""
    pair_3 = {"prompt_ids": [2], "chosen_ids": [3, 3], "rejected_ids": [1, 2]}
    whole = _loss([PAIR_1, PAIR_2, pair_3], beta=0.2)
    split = (_loss([PAIR_1], beta=0.2), _loss([PAIR_2, pair_3], beta=0.2))
    for name in whole.metrics:
        assert _logged(*split, name=name) == pytest.approx(_logged(whole, name=name), abs=GROUPING_TOL), name
    nll = [_logged(out, name="nll_loss") for out in split]
    assert abs(sum(nll) / 2 - _logged(whole, name="nll_loss")) > 1e-3  # a mean of means would differ
