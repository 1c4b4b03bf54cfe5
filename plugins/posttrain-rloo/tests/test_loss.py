"""RLOO's advantages, KL penalty and loss on hand-made tensors; expected values derived in docstrings."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain_rloo import kl_penalized_rewards, rloo_advantages, rloo_loss

# Expected values are exact (float64 math). Ours are float32 results of a few rounded operations on numbers of size
# <= 3 (~1e-6 at most): assert_close's float32 defaults (atol 1e-5, rtol 1.3e-6) and pytest.approx's (rel 1e-6) on
# exactly representable results cover them, and a formula error moves the values by 1e-2 or more.


def test_leave_one_out_advantages():
    """k = 4, rewards [1, 0, 0, 1]: baseline_i = (2 − r_i)/3, so A = 1 − 1/3 = 2/3 or 0 − 2/3 = −2/3.
    k = 2, rewards [3, 1]: each baseline is the other reward: A = [2, −2]."""
    adv, _ = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    adv, std = rloo_advantages(torch.tensor([3.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(std, torch.full((2,), math.sqrt(2)))


def test_unscorable_completions_leave_the_baseline():
    """[nan, 1, 3, 5]: 3 scorable, sum 9: baselines (9−1)/2 = 4, (9−3)/2 = 3, (9−5)/2 = 2 -> A = [0, −3, 0, 3].
    [nan, 2]: the only scorable completion has no other to compare with -> 0/0 -> A = 0."""
    adv, _ = rloo_advantages(torch.tensor([float("nan"), 1.0, 3.0, 5.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([0.0, -3.0, 0.0, 3.0]))
    adv, _ = rloo_advantages(torch.tensor([float("nan"), 2.0]), 2)
    torch.testing.assert_close(adv, torch.zeros(2))


def test_normalized_advantages():
    """A = [2/3, −2/3, −2/3, 2/3]: mean 0, Bessel std sqrt(4·(4/9)/3) = 0.7698004 -> A/(0.7698004 + 1e-4)."""
    adv, _ = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, normalize=True)
    a = (2 / 3) / (math.sqrt(16 / 27) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a]))


def test_kl_penalty_is_k1_summed_over_the_sequence():
    """β = 0.1. Row 0: old − ref = [0.5, 0] -> KL 0.5 -> reward 1 − 0.05 = 0.95. Row 1: [−0.5, (masked 2.0)]
    -> KL −0.5 (k1 can be negative) -> 1.05."""
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0], [-0.5, -3.0]])
    rewards, per_token = kl_penalized_rewards(torch.tensor([1.0, 1.0]), old, ref, torch.tensor([[1, 1], [1, 0]]), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.95, 1.05]))
    torch.testing.assert_close(per_token, torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))


def test_on_policy_loss_sums_sequences_and_gradient_is_minus_advantage():
    """Ratio 1: loss_sum = −Σ A_i = −(1 − 2) = 1 over n_items = 2 sequences; d/d logp_t = −A_i·m_t."""
    logps = torch.randn(2, 3).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss_sum, n, stats = rloo_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), mask)
    assert float(loss_sum.detach()) == pytest.approx(1.0) and n == 2
    loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0, 0.0], [2.0, 2.0, 2.0]]))
    assert float(stats["clip_ratio/region_mean"]) == 0.0


def test_sequence_ratio_is_clipped():
    """Σ_t logπ − Σ_t logπ_old = log 1.5 -> ρ = 1.5. A = +1: −min(1.5, 1.2) = −1.2, no gradient.
    A = −1: −min(−1.5, −1.2) = 1.5, gradient ρ·1 = 1.5 on each token. ε_high = 0.6: −1.5 unclipped."""
    old = torch.zeros(1, 2)
    for adv, value, grad, eps_high in ((1.0, -1.2, 0.0, None), (-1.0, 1.5, 1.5, None), (1.0, -1.5, -1.5, 0.6)):
        logps = torch.tensor([[math.log(1.5), 0.0]]).requires_grad_()
        loss_sum, _, stats = rloo_loss(logps, old, torch.tensor([adv]), torch.ones(1, 2), epsilon_high=eps_high)
        assert float(loss_sum.detach()) == pytest.approx(value)
        loss_sum.backward()
        torch.testing.assert_close(logps.grad, torch.tensor([[grad, grad]]))
        assert float(stats["clip_ratio/high_mean"]) == (1.0 if (adv > 0 and eps_high is None) else 0.0)
