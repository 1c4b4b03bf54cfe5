"""KTO loss functions on hand-made tensors; expected values derived in each docstring."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain.testing._rounding import rounding_tolerance
from posttrain_kto import LOSSES, apo_zero_unpaired_loss, kl_reference_point, kto_loss

# Expected values are exact (float64 math, then rounded to float32: <= 1.2e-7) or printed to 6 decimals (<= 5e-7).
# Ours are float32 results of <= 10 rounded operations (a difference, a product, a sigmoid, 1 - x, a weight) on
# numbers of size <= 2: off by <= 3e-6 (posttrain.testing._rounding). A formula error (a missing beta,
# a sign, the wrong z0) moves them by 1e-2 or more. Exactly representable results use assert_close's defaults.
ATOL = 5e-7 + rounding_tolerance(2.0, 10, sides=1)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


LOGPS = torch.tensor([-1.0, -2.0, -3.0, -4.0])
REF_LOGPS = torch.tensor([-1.5, -1.0, -3.0, -2.0])
LABELS = torch.tensor([True, True, False, False])


def test_kto_loss_hand_computed():
    """logratios r = [0.5, -1, 0, -2], z0 = 0.25, beta = 0.5, lambda_D = 1, lambda_U = 2.

    desirable:   1 - sigma(0.5 * (0.5 - 0.25)) = 1 - sigma(0.125)  = 0.468791
                 1 - sigma(0.5 * (-1 - 0.25))  = 1 - sigma(-0.625) = 0.651355
    undesirable: 2 * (1 - sigma(0.5 * (0.25 - 0))) = 2 * (1 - sigma(0.125)) = 0.937581
                 2 * (1 - sigma(0.5 * (0.25 + 2))) = 2 * (1 - sigma(1.125)) = 0.490170
    rewards = beta * r = [0.25, -0.5, 0, -1].
    """
    losses, rewards = kto_loss(
        LOGPS, REF_LOGPS, LABELS, torch.tensor(0.25), beta=0.5, desirable_weight=1.0, undesirable_weight=2.0
    )
    expected = [1 - sigmoid(0.125), 1 - sigmoid(-0.625), 2 * (1 - sigmoid(0.125)), 2 * (1 - sigmoid(1.125))]
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=0, atol=ATOL)
    torch.testing.assert_close(losses, torch.tensor([0.468791, 0.651355, 0.937581, 0.490170]), rtol=0, atol=ATOL)
    torch.testing.assert_close(rewards, torch.tensor([0.25, -0.5, 0.0, -1.0]))


def test_kl_reference_point_mean_of_mismatched_logratios():
    """kl_logps - ref_kl_logps = [1, -1, 2] -> mean 2/3 (positive, kept)."""
    kl = kl_reference_point(torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.0, -4.0]))
    assert kl.item() == pytest.approx(2 / 3, abs=1e-7)  # an exact sum (2.0) divided by 3: one rounding, 4e-8


def test_kl_reference_point_clamped_at_zero_and_detached():
    """[-1, -3] - [0, 0] has mean -2 < 0: the paper's max(0, .) gives 0; no gradient reaches the policy."""
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    kl = kl_reference_point(policy, torch.zeros(2))
    assert kl.item() == 0.0 and not kl.requires_grad


def test_policy_equal_to_reference_gives_half_weight():
    """r = 0 and z0 = 0: every loss is lambda * (1 - sigma(0)) = lambda / 2."""
    losses, rewards = kto_loss(
        LOGPS, LOGPS.clone(), LABELS, torch.tensor(0.0), beta=0.1, desirable_weight=1.5, undesirable_weight=0.5
    )
    torch.testing.assert_close(losses, torch.tensor([0.75, 0.75, 0.25, 0.25]))
    assert rewards.abs().max() == 0


def test_beta_to_zero_limit():
    """beta -> 0: sigma(beta * x) -> 1/2 for any logratio, so every loss -> lambda / 2."""
    losses, _ = kto_loss(LOGPS, REF_LOGPS, LABELS, torch.tensor(3.0), beta=1e-9)
    torch.testing.assert_close(losses, torch.full((4,), 0.5))


def test_kl_point_shifts_desirable_and_undesirable_in_opposite_directions():
    """A larger z0 makes a desirable example's loss larger and an undesirable example's smaller (r fixed)."""
    low, _ = kto_loss(LOGPS, REF_LOGPS, LABELS, torch.tensor(0.0), beta=0.5)
    high, _ = kto_loss(LOGPS, REF_LOGPS, LABELS, torch.tensor(1.0), beta=0.5)
    assert (high[:2] > low[:2]).all() and (high[2:] < low[2:]).all()


def test_gradient_flows_only_through_policy_logps():
    """The reference and z0 are constants: d loss / d logps exists, nothing else requires grad."""
    logps = LOGPS.clone().requires_grad_(True)
    losses, rewards = kto_loss(logps, REF_LOGPS, LABELS, kl_reference_point(logps, REF_LOGPS), beta=0.5)
    losses.sum().backward()
    assert logps.grad is not None and not rewards.requires_grad
    # desirable: d/dr [1 - sigma(b(r - z))] = -b sigma'(.) < 0 (raise r); undesirable: > 0 (lower r)
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()


def test_apo_zero_unpaired_hand_computed():
    """r = [0.5, -1, 0, -2], beta = 0.5, lambda_D = 1, lambda_U = 2, no reference point.

    desirable:   1 - sigma(0.25) = 0.437823,   1 - sigma(-0.5) = 0.622459
    undesirable: 2 * sigma(0)    = 1.0,        2 * sigma(-1)   = 0.537883
    """
    losses, rewards = apo_zero_unpaired_loss(
        LOGPS, REF_LOGPS, LABELS, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0
    )
    torch.testing.assert_close(losses, torch.tensor([0.437823, 0.622459, 1.0, 0.537883]), rtol=0, atol=ATOL)
    torch.testing.assert_close(rewards, torch.tensor([0.25, -0.5, 0.0, -1.0]))


def test_losses_are_the_config_choices_called_with_one_set_of_keywords():
    """KTOConfig.loss_type lists exactly LOSSES' names; each takes the same keywords (APO ignores the kl point)."""
    import typing

    from posttrain_kto.config import LossType

    assert typing.get_args(LossType) == tuple(LOSSES) and LOSSES["kto"] is kto_loss
    inputs = dict(
        logps=LOGPS, ref_logps=REF_LOGPS, labels=LABELS, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0
    )
    kl = torch.tensor(0.3)
    torch.testing.assert_close(
        LOSSES["kto"](**inputs, kl=kl)[0], kto_loss(LOGPS, REF_LOGPS, LABELS, kl, 0.5, 1.0, 2.0)[0]
    )
    torch.testing.assert_close(LOSSES["apo_zero_unpaired"](**inputs, kl=kl)[0], apo_zero_unpaired_loss(**inputs)[0])
