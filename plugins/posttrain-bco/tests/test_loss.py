"""BCO loss: hand-computed values, limiting cases, the running mean, and the method's loss on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain.testing._rounding import rounding_tolerance
from posttrain_bco import BCO, bco_loss, implicit_rewards, update_running_mean

# Hand values are printed to 6 decimals (off by <= 5e-7); ours are float32 results of <= 20 rounded operations (four
# softplus and a sum) on numbers of size <= 3: off by <= 6.4e-6 (posttrain.testing._rounding.rounding_tolerance). A
# formula error (a missing beta, delta on the wrong side) moves them by 1e-2 or more. Results that are exact, or
# compared with another float32 computation of the same size, use assert_close's defaults (atol 1e-5).
HAND_ATOL = 5e-7 + rounding_tolerance(3.0, 20, sides=1)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_bco_loss_hand_computed():
    """beta = 0.1, logps = [-4, -6, -5, -3], ref_logps = [-5, -5, -5, -4], labels = [T, F, T, F], delta = 0.05.

    r = beta * (logps - ref_logps) = [0.1, -0.1, 0.0, 0.1]
    r - delta = [0.05, -0.15, -0.05, 0.05]; undesirable rows flip the sign: x = [0.05, 0.15, -0.05, -0.05]
    l = log(1 + e^-x) = [0.668460, 0.620957, 0.718460, 0.718460]; sum = 2.726336
    """
    rewards = implicit_rewards(torch.tensor([-4.0, -6.0, -5.0, -3.0]), torch.tensor([-5.0, -5.0, -5.0, -4.0]), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.1, -0.1, 0.0, 0.1]))
    losses = bco_loss(rewards, torch.tensor([True, False, True, False]), 0.05)
    torch.testing.assert_close(losses, torch.tensor([0.668460, 0.620957, 0.718460, 0.718460]), atol=HAND_ATOL, rtol=0)
    assert losses.sum().item() == pytest.approx(2.726336, abs=HAND_ATOL)


def test_policy_equal_to_reference_gives_ln2():
    """r = 0 and delta = 0: every example, desirable or not, costs -log sigmoid(0) = ln 2."""
    losses = bco_loss(torch.zeros(3), torch.tensor([True, False, True]), 0.0)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))


def test_limits_and_gradient_direction():
    """A desirable row far above delta costs ~0, far below ~(delta - r); the gradient raises desirable rewards."""
    losses = bco_loss(torch.tensor([50.0, -50.0]), torch.tensor([True, True]), 0.0)
    assert losses[0].item() < 1e-12 and losses[1].item() == pytest.approx(50.0)
    r = torch.tensor([0.3, 0.3], requires_grad=True)
    bco_loss(r, torch.tensor([True, False]), 0.1).sum().backward()
    assert r.grad[0] < 0 < r.grad[1]  # gradient descent raises the desirable reward, lowers the undesirable one


def test_delta_tensor_gets_no_gradient_and_shift_is_symmetric():
    """Shifting rewards and delta by the same constant leaves the loss unchanged."""
    r, labels = torch.tensor([0.2, -0.4, 0.1]), torch.tensor([True, False, False])
    torch.testing.assert_close(bco_loss(r, labels, 0.1), bco_loss(r + 3.0, labels, 3.1))


def test_running_mean_is_grouping_invariant():
    """The mean of [1, 2, 3, 10] is 4 whether folded in at once, one by one or 2 + 2; empty batches change nothing."""
    at_once = update_running_mean(0.0, 0.0, 16.0, 4.0)
    mean, count = 0.0, 0.0
    for x in (1.0, 2.0, 3.0, 10.0):
        mean, count = update_running_mean(mean, count, x, 1.0)
    halves = update_running_mean(*update_running_mean(0.0, 0.0, 3.0, 2.0), 13.0, 2.0)
    assert at_once == (4.0, 4.0) and (mean, count) == pytest.approx((4.0, 4.0)) and halves == pytest.approx((4.0, 4.0))
    assert update_running_mean(1.5, 7.0, 0.0, 0.0) == (1.5, 7.0)


FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7


def _logps_atol(logps: float, n_tokens: int) -> float:
    """How far two float32 computations of one sequence's log-prob may legitimately differ.

    The method scores rows in a padded batch, the reference below alone: the same float32 arithmetic in
    another reduction order (and, on other CPUs, other kernels). Each per-token log-prob out of a
    log-softmax is accurate to a few ulps of its own size plus the logit scale (~1), and a sequence sums
    ``n_tokens`` of them, so 4 * eps * (|log p| + n) bounds the difference with a wide margin (observed on
    this tiny model: <= 2e-7 for |log p| ~ 28, about 1/20 of the bound). A formula error (a missing beta,
    a wrong delta) moves the values by orders of magnitude more.
    """
    return 4 * FLOAT32_EPS * (abs(logps) + n_tokens)


def _manual_logps(model, row) -> float:
    """Independent: run the unpadded sequence alone, sum log p(token) over the completion tokens."""
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = len(row["prompt_ids"])
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def test_method_loss_matches_independent_computation(bco_ctx):
    """On a tiny model whose policy differs from the reference, loss_sum = sum of -log sigmoid(+-(r - delta)), with
    delta = mean of this batch's rewards after the first training update; evaluation leaves delta alone."""
    method = BCO()
    method.setup(bco_ctx)
    with torch.no_grad():  # move the policy away from the reference so rewards are not all zero
        bco_ctx.model.lm_head.weight.add_(0.05 * torch.randn_like(bco_ctx.model.lm_head.weight))
    rows = method.prepare(
        [
            {"prompt": "Hi ", "completion": "there", "label": True},
            {"prompt": "Hello, ", "completion": "go", "label": False},
            {"prompt": "x", "completion": "yes!!", "label": False},
        ],
        bco_ctx,
    )
    batch = method.collate(rows, bco_ctx)
    beta = bco_ctx.config.beta
    policy = [_manual_logps(bco_ctx.model, r) for r in rows]
    reference = [_manual_logps(method.ref_model, r) for r in rows]
    rewards = [beta * (p - q) for p, q in zip(policy, reference)]
    delta = sum(rewards) / 3
    expected = sum(
        softplus_neg(r - delta) if row["label"] else softplus_neg(delta - r) for r, row in zip(rewards, rows)
    )
    # r_i = beta * (log p - log p_ref): both terms carry the float32 error bound of _logps_atol
    reward_atol = [
        beta * (_logps_atol(p, len(r["completion_ids"])) + _logps_atol(q, len(r["completion_ids"])))
        for p, q, r in zip(policy, reference, rows)
    ]
    # softplus has slope <= 1, and delta (a mean of the rewards) moves by at most the largest reward error
    loss_atol = sum(reward_atol) + 3 * max(reward_atol)

    out = method.loss(bco_ctx.model, batch, bco_ctx)
    assert out.n_items == 3
    assert out.loss_sum.item() == pytest.approx(expected, rel=0, abs=loss_atol)
    assert method.delta == pytest.approx(delta, rel=0, abs=max(reward_atol)) and method.delta_count == 3
    chosen, rejected = out.metrics["rewards/chosen"], out.metrics["rewards/rejected"]
    assert (chosen.kind, float(chosen.denominator), rejected.kind, float(rejected.denominator)) == (
        "ratio",
        1,
        "ratio",
        2,
    )
    assert float(chosen.value) == pytest.approx(rewards[0], rel=0, abs=reward_atol[0])
    assert float(rejected.value) == pytest.approx(rewards[1] + rewards[2], rel=0, abs=sum(reward_atol[1:]))
    assert out.metrics["delta"].kind == "last" and out.metrics["delta"].value == method.delta

    bco_ctx.training = False
    method.loss(bco_ctx.model, batch, bco_ctx)
    assert method.delta == pytest.approx(delta, rel=0, abs=max(reward_atol)) and method.delta_count == 3


def test_state_dict_round_trip():
    method = BCO()
    method.delta, method.delta_count = 0.125, 48.0
    again = BCO()
    again.load_state_dict(method.state_dict())
    assert (again.delta, again.delta_count) == (0.125, 48.0)


def test_kind_metrics_pool_rows_over_micro_batches(bco_ctx):
    """rewards/* and logps/* are sums over the rows of a kind with their counts (as TRL's BCO logs them): evaluating
    1 desirable row and then 2 logs what the 3 in one micro-batch do; a mean of the two means would not."""
    method = BCO()
    method.setup(bco_ctx)
    bco_ctx.training = False  # delta stays put, so each call scores the rows alike
    with torch.no_grad():
        bco_ctx.model.lm_head.weight.add_(0.5 * torch.randn_like(bco_ctx.model.lm_head.weight))
    rows = method.prepare(
        [
            {"prompt": "Hi ", "completion": "there", "label": True},
            {"prompt": "Hello, ", "completion": "go", "label": True},
            {"prompt": "x", "completion": "yes!!", "label": True},
        ],
        bco_ctx,
    )
    with torch.no_grad():
        whole = method.loss(bco_ctx.model, method.collate(rows, bco_ctx), bco_ctx).metrics
        split = [
            method.loss(bco_ctx.model, method.collate(part, bco_ctx), bco_ctx).metrics for part in (rows[:1], rows[1:])
        ]

    def pooled(*metric_dicts, name):
        return sum(float(m[name].value) for m in metric_dicts) / sum(float(m[name].denominator) for m in metric_dicts)

    for name in ("rewards/chosen", "logps/chosen"):
        assert pooled(*split, name=name) == pytest.approx(pooled(whole, name=name), rel=1e-5), name
    means = [pooled(m, name="logps/chosen") for m in split]
    assert abs(sum(means) / 2 - pooled(whole, name="logps/chosen")) > 1e-3  # the grouping would matter
