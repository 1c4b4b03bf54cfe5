"""Generalised JSD and agreement on hand-made tensors; expected values derived in each docstring."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain.testing._rounding import rounding_tolerance
from posttrain_distill import generalized_jsd, top1_agreement, use_on_policy

# one position, vocabulary of 3: p_s = [0.5, 0.3, 0.2], p_t = [0.2, 0.5, 0.3]
STUDENT = torch.tensor([[[0.5, 0.3, 0.2]]]).log()  # (1, 1, 3) logits
TEACHER = torch.tensor([[[0.2, 0.5, 0.3]]]).log()
# Hand values are printed to 6 decimals (off by <= 5e-7); ours are float32 results of <= 30 rounded operations
# (log-softmaxes over 3 logits, a mixture, products and sums) on numbers of size <= 2: off by <= 2.6e-6 (ATOL). Two
# float32 formulas for the same divergence over a vocabulary of 7 (<= 64 operations on numbers <= 10 each) may round
# apart by up to 7.6e-5 (PAIR_ATOL). See posttrain.testing._rounding. A formula error (beta and 1 - beta
# swapped, the mixture on the wrong side) moves the values by 1e-2 or more.
ATOL = 5e-7 + rounding_tolerance(2.0, 30, sides=1)
PAIR_ATOL = rounding_tolerance(10.0, 64)


def test_beta_0_is_forward_kl_teacher_to_student():
    """KL(p_t || p_s) = 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.2) = -0.183258 + 0.255413 + 0.121640 = 0.193794."""
    assert generalized_jsd(STUDENT, TEACHER, beta=0.0).item() == pytest.approx(0.193794, abs=ATOL)


def test_beta_1_is_reverse_kl_student_to_teacher():
    """KL(p_s || p_t) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.458145 - 0.153248 - 0.081093 = 0.223805."""
    assert generalized_jsd(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(0.223805, abs=ATOL)


def test_beta_half_is_the_jensen_shannon_divergence():
    """m = (p_s + p_t)/2 = [0.35, 0.4, 0.25]; KL(p_t||m) = 0.054345, KL(p_s||m) = 0.047404; JSD = mean = 0.050875."""
    assert generalized_jsd(STUDENT, TEACHER, beta=0.5).item() == pytest.approx(0.050875, abs=ATOL)


def test_beta_quarter_uses_the_skewed_mixture():
    """m = 0.75 p_s + 0.25 p_t = [0.425, 0.35, 0.225]; 0.25 KL(p_t||m) + 0.75 KL(p_s||m)
    = 0.25 * 0.113888 + 0.75 * 0.011458 = 0.037065."""
    assert generalized_jsd(STUDENT, TEACHER, beta=0.25).item() == pytest.approx(0.037065, abs=ATOL)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_matches_a_direct_computation_on_random_logits(beta):
    """Against torch's kl_div on probabilities, for a (2, 3, 7) batch."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    ps, pt = s.softmax(-1), t.softmax(-1)

    def kl(p, q):  # KL(p || q) per position
        return torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)

    if beta == 0.0:
        expected = kl(pt, ps)
    elif beta == 1.0:
        expected = kl(ps, pt)
    else:
        m = (1 - beta) * ps + beta * pt
        expected = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    torch.testing.assert_close(generalized_jsd(s, t, beta), expected, rtol=0, atol=PAIR_ATOL)


def test_identical_distributions_give_zero_and_symmetry_swaps_beta():
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    for beta in (0.0, 0.3, 1.0):  # 0 up to the mixture's rounding: log m - log p <= 2 roundings, times p, summed
        assert generalized_jsd(s, s.clone(), beta).abs().max() < 1e-6
    # JSD_beta(s, t) = JSD_{1-beta}(t, s): the mixture and the weights swap together
    torch.testing.assert_close(generalized_jsd(s, t, 0.3), generalized_jsd(t, s, 0.7), rtol=0, atol=PAIR_ATOL)


def test_temperature_divides_both_logits():
    s, t = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    # dividing by 0.5 is exact in binary, so both sides do the same arithmetic
    torch.testing.assert_close(generalized_jsd(s, t, 0.5, temperature=0.5), generalized_jsd(s / 0.5, t / 0.5, 0.5))


def test_interpolated_formula_vanishes_near_the_ends():
    """Why beta = 0 and 1 are special-cased: JSD_beta -> 0 as beta -> 0 or 1 (the mixture becomes one side).

    At beta = 1e-6 it is ~beta times a KL of ~0.2, plus rounding (~1e-7): far below 1e-5."""
    assert generalized_jsd(STUDENT, TEACHER, beta=1e-6).item() < 1e-5
    assert generalized_jsd(STUDENT, TEACHER, beta=1 - 1e-6).item() < 1e-5


def test_gradient_reaches_only_the_student():
    s = STUDENT.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(False)
    generalized_jsd(s, t, 0.5).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_top1_agreement_counts_masked_positions_only():
    """Argmax student [0, 1, 2, 2], teacher [0, 2, 2, 1], mask [1, 1, 1, 0]: agree at 0 and 2 -> 2/3."""
    eye = torch.eye(3)
    student = eye[[0, 1, 2, 2]][None]  # (1, 4, 3)
    teacher = eye[[0, 2, 2, 1]][None]
    assert top1_agreement(student, teacher, torch.tensor([[1, 1, 1, 0]])).item() == pytest.approx(2 / 3)
    assert top1_agreement(student, teacher, torch.zeros(1, 4)).item() == 0.0


def test_on_policy_choice_is_seeded_and_has_the_right_frequency():
    draws = [use_on_policy(7, step, micro, 0.3) for step in range(500) for micro in range(4)]
    assert draws == [use_on_policy(7, step, micro, 0.3) for step in range(500) for micro in range(4)]
    # 2000 Bernoulli(0.3) draws: std 0.01. The draws are a fixed function of the seeds (the same on every machine),
    # so this either always passes or always fails; 3 std away catches a wrong probability, not bad luck.
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws != [use_on_policy(8, step, micro, 0.3) for step in range(500) for micro in range(4)]
    assert all(use_on_policy(0, s, 0, 1.0) for s in range(10)) and not any(
        use_on_policy(0, s, 0, 0.0) for s in range(10)
    )
    assert math.isclose(sum(use_on_policy(1, s, 0, 0.5) for s in range(2000)) / 2000, 0.5, abs_tol=0.04)
