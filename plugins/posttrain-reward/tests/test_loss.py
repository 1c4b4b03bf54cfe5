"""Bradley–Terry loss, margin, centering and metrics against hand-computed values (no model, milliseconds).

Reference numbers: -log σ(x) = log(1 + e^-x), so
    x =  1   -> log(1 + e^-1)   = 0.313261687518
    x =  0   -> log 2           = 0.693147180560
    x = -1   -> log(1 + e)      = 1.313261687518
    x =  0.5 -> log(1 + e^-0.5) = 0.474076984180
"""

from __future__ import annotations

import math

import pytest
import torch
from posttrain import Metric
from posttrain.testing._rounding import rounding_tolerance
from posttrain_reward import bradley_terry_loss, reward_metrics

CHOSEN = torch.tensor([1.0, 0.0, -0.5])
REJECTED = torch.tensor([0.0, 0.0, 0.5])  # differences r_c - r_r = [1, 0, -1]
# The reference numbers are exact to 12 digits; ours are float32, <= 10 rounded operations (a difference, a margin, a
# softplus, a centering term, a sum) on numbers of size <= 3: off by <= 4.3e-6 (posttrain.testing._rounding). A formula
# error (the margin outside the sigmoid, a missing centering term) moves them by 1e-2 or more.
ATOL = rounding_tolerance(3.0, 10, sides=1)


def test_loss_matches_hand_computation():
    """Differences [1, 0, -1] give per-pair losses log(1+e^-1), log 2, log(1+e); their sum is 2.319670555596."""
    losses = bradley_terry_loss(CHOSEN, REJECTED)
    expected = [0.313261687518, 0.693147180560, 1.313261687518]
    assert losses.tolist() == pytest.approx(expected, abs=ATOL)
    assert float(losses.sum()) == pytest.approx(2.319670555596, abs=ATOL)


def test_margin_is_subtracted_inside_the_sigmoid():
    """margin [0.5, 1, 0] turns the differences [1, 0, -1] into [0.5, -1, -1]:
    losses log(1+e^-0.5) = 0.474076984180, log(1+e) = 1.313261687518 (twice)."""
    losses = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.5, 1.0, 0.0]))
    assert losses.tolist() == pytest.approx([0.474076984180, 1.313261687518, 1.313261687518], abs=ATOL)


def test_zero_margin_equals_no_margin():
    assert torch.equal(
        bradley_terry_loss(CHOSEN, REJECTED, margin=torch.zeros(3)), bradley_terry_loss(CHOSEN, REJECTED)
    )


def test_centering_term_hand_computation():
    """c = 0.01, sums r_c + r_r = [1, 0, 0]: only pair 0 gains 0.01 * 1² -> 0.323261687518."""
    losses = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.01)
    assert losses.tolist() == pytest.approx([0.323261687518, 0.693147180560, 1.313261687518], abs=ATOL)


def test_mean_of_pair_losses_is_trls_batch_loss():
    """TRL: mean(-logσ(Δ - m)) + c * mean((r_c + r_r)²); the per-pair sum divided by B must equal it."""
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(5), torch.randn(5), torch.rand(5)
    ours = bradley_terry_loss(chosen, rejected, margin, 0.05).sum() / 5
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean() + 0.05 * ((chosen + rejected) ** 2).mean()
    # two float32 orders of the same ~20 operations on numbers of size <= 5
    assert float(ours) == pytest.approx(float(trl), rel=0, abs=rounding_tolerance(5.0, 20))


def test_limits():
    """Equal rewards cost log 2; a large correct gap costs ~0; a large wrong gap costs ~the gap."""
    same = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0]))
    assert float(same) == pytest.approx(math.log(2))
    assert float(bradley_terry_loss(torch.tensor([30.0]), torch.tensor([0.0]))) < 1e-12
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([30.0]))) == pytest.approx(30.0)
    assert torch.equal(
        bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.0), bradley_terry_loss(CHOSEN, REJECTED)
    )


def test_gradient():
    """d/dr_c [-log σ(Δ)] = -σ(-Δ) and d/dr_r = +σ(-Δ); centering adds 2c(r_c + r_r) to both."""
    chosen = torch.tensor([1.0, -0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1).sum().backward()
    delta = torch.tensor([1.0, -1.0])
    center = 2 * 0.1 * torch.tensor([1.0, 0.0])
    assert chosen.grad.tolist() == pytest.approx((-torch.sigmoid(-delta) + center).tolist(), abs=ATOL)
    assert rejected.grad.tolist() == pytest.approx((torch.sigmoid(-delta) + center).tolist(), abs=ATOL)


def test_bf16_rewards_are_upcast():
    losses = bradley_terry_loss(CHOSEN.bfloat16(), REJECTED.bfloat16())
    assert losses.dtype == torch.float32


def test_metrics_hand_values():
    """Rewards c = [1, 0, -0.5], r = [0, 0, 0.5]: one win, one tie (counts as wrong), one loss.
    accuracy 1/3; margin mean([1, 0, -1]) = 0; over all six rewards min -0.5, max 1, mean 1/6;
    rewards/chosen mean 1/6, rewards/rejected mean 1/6. Means are sums with their counts (Metric.ratio)."""
    m = reward_metrics(CHOSEN, REJECTED)
    sums = {name: (float(v.value), float(v.denominator)) for name, v in m.items() if isinstance(v, Metric)}
    assert all(m[name].kind == "ratio" for name in sums)
    assert sums == {
        "accuracy": (1.0, 3.0),
        "margin": (0.0, 3.0),
        "mean_reward": (pytest.approx(1.0), 6.0),
        "rewards/chosen": (0.5, 3.0),
        "rewards/rejected": (0.5, 3.0),
    }
    assert float(m["min_reward"]) == -0.5 and float(m["max_reward"]) == 1.0  # this micro-batch's extremes
    parts = [x for v in m.values() for x in ((v.value, v.denominator) if isinstance(v, Metric) else (v,))]
    assert not any(isinstance(x, torch.Tensor) and x.requires_grad for x in parts)


def test_metric_means_pool_pairs_over_micro_batches():
    """Pairs split 1 + 2 log what the 3 together do: sums and counts add up, means of means would not."""
    whole = reward_metrics(CHOSEN, REJECTED)
    parts = [reward_metrics(CHOSEN[:1], REJECTED[:1]), reward_metrics(CHOSEN[1:], REJECTED[1:])]
    for name in ("accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected"):
        pooled = sum(float(p[name].value) for p in parts) / sum(float(p[name].denominator) for p in parts)
        assert pooled == pytest.approx(float(whole[name].value) / float(whole[name].denominator)), name
    assert float(parts[0]["accuracy"].value) / 1 == 1.0 and float(parts[1]["accuracy"].value) / 2 == 0.0
