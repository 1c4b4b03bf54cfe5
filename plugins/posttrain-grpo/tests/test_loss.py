"""GRPO's loss on hand-made tensors; every expected value is derived in the docstring."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain.testing._rounding import rounding_tolerance
from posttrain_grpo import (
    bnpo_normalization,
    clipped_surrogate,
    dapo_normalization,
    dr_grpo_normalization,
    group_advantages,
    grpo_loss,
    grpo_normalization,
    importance_ratio,
    k3_kl,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
# Expected values are exact (float64 math), or printed to 6-7 digits (off by <= 5e-7). Ours are float32 results of
# <= 10 rounded operations on numbers of size <= 3: off by <= 4.5e-6 (ATOL; posttrain.testing._rounding). Tensors use
# assert_close's float32 defaults (atol 1e-5, rtol 1.3e-6), which cover that too. A formula error (the wrong std,
# a missing clip, a sign) moves the values by 1e-2 or more.
ATOL = 5e-7 + rounding_tolerance(3.0, 10, sides=1)


def test_group_advantages_scale_group():
    """Group 1 = [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(4 x 0.25 / 3) = 0.5773503, so
    A = ±0.5 / (0.5773503 + 1e-4) = ±0.8658753. Group 2 = [2, 2, 2, 2]: std 0, A = 0 / 1e-4 = 0."""
    adv, std = group_advantages(REWARDS, 4, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.8658753, abs=1e-6)  # float64 against 7 printed digits
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(std[:4], torch.full((4,), math.sqrt(1 / 3)))
    assert (std[4:] == 0).all()


def test_group_advantages_scale_batch_and_none():
    """batch: the std of all 8 rewards (mean 1.25, squared deviations sum 5.5, /7 -> std 0.8864053), the
    mean still per group: A = ±0.5 / 0.8865053 = ±0.5640126. none: A = r − group mean = ±0.5 (Dr. GRPO)."""
    adv, _ = group_advantages(REWARDS, 4, "batch")
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    assert a == pytest.approx(0.5640126, abs=1e-6)  # float64 against 7 printed digits
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    adv, _ = group_advantages(REWARDS, 4, "none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_unscorable_completions_are_left_out_and_get_zero_advantage():
    """[nan, 1, 3, nan]: mean and std over {1, 3} only (2, sqrt 2); A = [0, −1/1.4143136, +1/1.4143136, 0]."""
    adv, _ = group_advantages(torch.tensor([float("nan"), 1.0, 3.0, float("nan")]), 4, "group")
    a = 1 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([0.0, -a, a, 0.0]))


# per-token losses [[1, 2, 3], [4, 5, 6]] with mask [[1, 1, 0], [1, 0, 0]]: masked sum 7 over 3 tokens
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_grpo_normalization_is_a_mean_of_sequence_means():
    """Sequence means (1+2)/2 = 1.5 and 4/1 = 4 -> loss_sum 5.5 over n_items = 2 sequences = 2.75."""
    loss_sum, n = grpo_normalization(LOSS, MASK, 4)
    assert (float(loss_sum), n) == (5.5, 2)


def test_bnpo_normalization_is_the_micro_batch_token_mean():
    """TRL's bnpo: 7 / 3 tokens per micro-batch, n_items = 1, so the step averages micro-batch means."""
    loss_sum, n = bnpo_normalization(LOSS, MASK, 4)
    assert float(loss_sum) == pytest.approx(7 / 3) and n == 1


def test_dr_grpo_normalization_divides_by_sequences_times_max_length():
    """Dr. GRPO: 7 / (2 sequences x L_max 4) -> loss_sum 7, n_items 8."""
    loss_sum, n = dr_grpo_normalization(LOSS, MASK, 4)
    assert (float(loss_sum), n) == (7.0, 8)


def test_dapo_normalization_counts_tokens_and_differs_from_bnpo_over_micro_batches():
    """DAPO: 7 over 3 tokens. With a second micro-batch of one token of loss 1 the step is
    dapo (7 + 1) / (3 + 1) = 2.0 but bnpo (7/3 + 1/1) / 2 = 1.6667."""
    loss_sum, n = dapo_normalization(LOSS, MASK, 4)
    assert (float(loss_sum), int(n)) == (7.0, 3)
    other, other_mask = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    sums = [dapo_normalization(LOSS, MASK, 4), dapo_normalization(other, other_mask, 4)]
    assert float(sum(s for s, _ in sums) / sum(n for _, n in sums)) == pytest.approx(2.0)
    sums = [bnpo_normalization(LOSS, MASK, 4), bnpo_normalization(other, other_mask, 4)]
    assert float(sum(s for s, _ in sums) / sum(n for _, n in sums)) == pytest.approx(5 / 3)


def test_clipped_surrogate_values_and_gradients():
    """ε = 0.2. Per token −min(ρA, clip(ρ, 0.8, 1.2)A), gradient w.r.t. logp is −ρA unless clipped:
    ρ=1.5, A=+1 -> −1.2, grad 0 (clipped) | ρ=0.5, A=+1 -> −0.5, grad −0.5
    ρ=0.5, A=−1 -> +0.8, grad 0 (clipped) | ρ=1.5, A=−1 -> +1.5, grad +1.5."""
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_()
    ratio = importance_ratio(logps, old, torch.ones(4, 1), "token")
    advantages = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    loss = clipped_surrogate(ratio, advantages, logps, epsilon_low=0.2, epsilon_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [-0.5], [0.8], [1.5]]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0], [-0.5], [0.0], [1.5]]))


def test_epsilon_high_raises_only_the_upper_bound_and_clip_metrics():
    """ρ = 1.25, A = +1: clipped to 1.2 with ε_high = ε = 0.2 (−1.2), kept with ε_high = 0.28 (−1.25).
    The clipped token counts in clip_ratio/high_mean (1 of 2 tokens -> 0.5), none in low_mean."""
    logps = torch.log(torch.tensor([[1.25, 1.0]]))
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    loss_sum, n, stats = grpo_loss(logps, torch.zeros(1, 2), adv, mask, epsilon=0.2)
    assert float(loss_sum) == pytest.approx(-2.2) and int(n) == 2
    assert float(stats["clip_ratio/high_mean"]) == 0.5 and float(stats["clip_ratio/low_mean"]) == 0.0
    assert float(stats["clip_ratio/high_max"]) == 0.5 and float(stats["clip_ratio/region_mean"]) == 0.5
    loss_sum, _, stats = grpo_loss(logps, torch.zeros(1, 2), adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert float(loss_sum) == pytest.approx(-2.25) and float(stats["clip_ratio/high_mean"]) == 0.0


def test_k3_kl_value_gradient_and_bias_correction():
    """logp = log 0.5, ref = log 0.25: δ = ref − logp = −log 2, k3 = e^δ − δ − 1 = 0.5 + 0.693147 − 1
    = 0.193147. On-policy (ρ = 1 with grad), A = 0, β = 0.1: loss = 0.1·0.193147. d(ρ·k3)/dlogp =
    k3 + (1 − e^δ) = 0.693147 -> grad 0.0693147; without the correction d k3/dlogp = 0.5 -> 0.05."""
    ref = torch.log(torch.tensor([[0.25]]))
    for correction, grad in ((True, 0.1 * math.log(2)), (False, 0.05)):
        logps = torch.log(torch.tensor([[0.5]])).requires_grad_()
        loss_sum, _, stats = grpo_loss(
            logps,
            logps.detach(),
            torch.zeros(1),
            torch.ones(1, 1),
            beta=0.1,
            ref_logps=ref,
            use_bias_correction_kl=correction,
        )
        assert float(loss_sum.detach()) == pytest.approx(0.1 * (0.5 + math.log(2) - 1), abs=ATOL)
        assert float(stats["kl"]) == pytest.approx(0.193147, abs=ATOL)
        loss_sum.backward()
        assert float(logps.grad) == pytest.approx(grad, abs=ATOL)


def test_kl_is_zero_when_policy_equals_reference():
    logps = torch.randn(3, 4)
    assert torch.equal(k3_kl(logps, logps), torch.zeros(3, 4))


def test_on_policy_dapo_gradient_is_minus_advantage_over_tokens():
    """With old = logp.detach() the ratio is 1 and d loss_sum / d logp_t = −A_i·m_t. A = [1, −2],
    lengths 2 and 3: loss_sum = −(1·2 − 2·3) = 4 over n_items = 5 tokens; masked tokens get no gradient."""
    logps = torch.randn(2, 3).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss_sum, n, _ = grpo_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), mask)
    assert float(loss_sum.detach()) == pytest.approx(4.0) and int(n) == 5
    loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0, 0.0], [2.0, 2.0, 2.0]]))


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="dr_grpo")


def test_loss_family_is_one_dict():
    from posttrain_grpo import LOSSES, GRPOConfig

    assert set(LOSSES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"}
    import typing

    assert set(typing.get_args(typing.get_type_hints(GRPOConfig)["loss_type"])) == set(LOSSES)


def test_cispo_clips_and_detaches_the_weight_and_sums_tokens():
    """logps (-1, -2), old (-1.5, -2): rho = (e^0.5 = 1.6487, 1); A = 2, eps_max = 1.5 -> weights (1.5, 1).
    loss_t = -w_t·A·logp_t = (3, 4), summed over tokens like dapo: 7 over 2 items.
    d loss / d logp_t = -w_t·A = (-3, -2): the weight is a constant, the gradient flows through log pi."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss_sum, n, stats = grpo_loss(
        logps, torch.tensor([[-1.5, -2.0]]), torch.tensor([2.0]), torch.ones(1, 2), loss_type="cispo", epsilon_high=1.5
    )
    assert float(loss_sum.detach()) == pytest.approx(7.0) and int(n) == 2
    loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-3.0, -2.0]]))
    assert float(stats["cispo_clip_ratio"]) == pytest.approx(0.5)  # token 0 is above eps_max with A > 0


def test_sapo_soft_gate_values_and_on_policy_gradient():
    """On-policy rho = 1: sigma(0) = 1/2, so loss_t = -(4/tau)/2·A. A = (2, -1); tau = 1 for A > 0, 1.05 else.
    Sequence 0 (2 tokens): -4 per token, mean -4. Sequence 1 (1 token): +1/1.05·2 = 1.9047619. Sum -2.0952381
    over 2 sequences (aggregated like grpo). Gradient at rho = 1 is -(4/tau)·sigma'(0)·tau·A = -A per token,
    then divided by the sequence's token count: (-1, -1) and (+1)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss_sum, n, _ = grpo_loss(logps, logps.detach(), torch.tensor([2.0, -1.0]), mask, loss_type="sapo")
    assert float(loss_sum.detach()) == pytest.approx(-4.0 + 2 / 1.05, abs=1e-6) and n == 2
    loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))


def test_sequence_level_importance_sampling_is_gspo():
    """logps (-1, -2), old (-1.2, -2.4): mean log-ratio 0.3, one rho = e^0.3 = 1.3498588 for the sequence.
    A = +1: clipped at 1 + eps = 1.2, loss -1.2, no gradient. A = -1: -min(-rho, -1.2) = rho, and
    d rho / d logp_t = rho / T = 0.6749294 for each of the T = 2 tokens."""
    old = torch.tensor([[-1.2, -2.4]])
    for advantage, expected, grad in ((1.0, -1.2, 0.0), (-1.0, math.exp(0.3), math.exp(0.3) / 2)):
        logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        loss_sum, n, _ = grpo_loss(
            logps,
            old,
            torch.tensor([advantage]),
            torch.ones(1, 2),
            loss_type="grpo",
            importance_sampling_level="sequence",
        )
        assert float(loss_sum.detach()) == pytest.approx(expected, abs=1e-6) and n == 1
        loss_sum.backward()
        torch.testing.assert_close(logps.grad, torch.full((1, 2), grad))


def test_importance_sampling_weights_multiply_the_policy_term_not_the_kl():
    """IS weight w = 2 on every token, on-policy dapo with A = 1: policy term -A·w per token = -2; with
    beta = 0.5 and ref = logp the KL term is 0. Doubling w doubles the policy term only."""
    logps = torch.tensor([[-1.0, -1.0]])
    plain, _, _ = grpo_loss(logps, logps, torch.tensor([1.0]), torch.ones(1, 2), beta=0.5, ref_logps=logps)
    weighted, _, _ = grpo_loss(
        logps,
        logps,
        torch.tensor([1.0]),
        torch.ones(1, 2),
        beta=0.5,
        ref_logps=logps,
        is_weights=torch.full((1, 2), 2.0),
    )
    assert float(plain) == pytest.approx(-2.0) and float(weighted) == pytest.approx(-4.0)


def test_delta_caps_the_unclipped_ratio():
    """INTELLECT-2: rho = e^1 = 2.718 with A = -1: -min(-rho, -1.2) = rho; delta = 2 caps it at 2."""
    logps, old = torch.tensor([[0.0]]), torch.tensor([[-1.0]])
    loss, _, _ = grpo_loss(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), delta=2.0)
    assert float(loss) == pytest.approx(2.0)
