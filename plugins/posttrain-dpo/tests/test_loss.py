"""Each DPO loss function against hand-derived numbers and an independent scalar implementation.

The shared batch (3 pairs, beta = 0.5), log-probs made up by hand:

    chosen_logps       = [-1.0, -2.0, -3.0]    ref_chosen_logps   = [-1.5, -2.0, -2.0]
    rejected_logps     = [-2.0, -1.5, -3.0]    ref_rejected_logps = [-1.5, -2.0, -4.0]
    r_w = chosen - ref   = [ 0.5,  0.0, -1.0]
    r_l = rejected - ref = [-0.5,  0.5,  1.0]
    r_w - r_l            = [ 1.0, -0.5, -2.0]  ->  z = beta * (r_w - r_l) = [0.5, -0.25, -1.0]
    completion lengths: chosen [2, 4, 1], rejected [1, 2, 5]

The reference implementations below use only the ``math`` module, one pair at a time, written from the
papers' formulas (not from loss.py). Run: pytest plugins/posttrain-dpo/tests/test_loss.py
"""

import math
import typing

import posttrain_dpo
import pytest
import torch
from posttrain.testing._rounding import FLOAT64_U, rounding_tolerance
from posttrain_dpo import (
    LOSSES,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    sft_loss,
    sppo_hard_loss,
)

BETA = 0.5
CHOSEN, REJECTED = [-1.0, -2.0, -3.0], [-2.0, -1.5, -3.0]
REF_CHOSEN, REF_REJECTED = [-1.5, -2.0, -2.0], [-1.5, -2.0, -4.0]
LEN_CHOSEN, LEN_REJECTED = [2, 4, 1], [1, 2, 5]
R_W = [c - rc for c, rc in zip(CHOSEN, REF_CHOSEN)]
R_L = [r - rr for r, rr in zip(REJECTED, REF_REJECTED)]
# Everything here is float64. A loss of at most ~20 operations on numbers <= 10 is off by at most 8e-14 from the
# math-module reference, itself rounded (posttrain.testing._rounding.rounding_tolerance): F64_TOL, for formula against
# formula. Hand numbers written to 16 digits, or exact, use assert_close's float64 defaults (rtol = atol = 1e-7):
# far above rounding, far below a formula error (>= 1e-2).
F64_TOL = rounding_tolerance(10.0, 20, FLOAT64_U)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# -- independent scalar references (one pair at a time) ------------------------------------------------
REFERENCE = {
    "sigmoid": lambda rw, rl, lw, ll, c, b, eps: (
        -(1 - eps) * log_sigmoid(b * (rw - rl)) - eps * log_sigmoid(-b * (rw - rl))
    ),
    "hinge": lambda rw, rl, lw, ll, c, b, eps: max(0.0, 1 - b * (rw - rl)),
    "ipo": lambda rw, rl, lw, ll, c, b, eps: (rw / lw - rl / ll - 1 / (2 * b)) ** 2,
    "robust": lambda rw, rl, lw, ll, c, b, eps: (
        ((1 - eps) * -log_sigmoid(b * (rw - rl)) - eps * -log_sigmoid(-b * (rw - rl))) / (1 - 2 * eps)
    ),
    "bco_pair": lambda rw, rl, lw, ll, c, b, eps: -log_sigmoid(b * rw) - log_sigmoid(-b * rl),
    "sppo_hard": lambda rw, rl, lw, ll, c, b, eps: (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2,
    "nca_pair": lambda rw, rl, lw, ll, c, b, eps: (
        -log_sigmoid(b * rw) - 0.5 * log_sigmoid(-b * rw) - 0.5 * log_sigmoid(-b * rl)
    ),
    "apo_zero": lambda rw, rl, lw, ll, c, b, eps: 1 - sigmoid(b * rw) + sigmoid(b * rl),
    "apo_down": lambda rw, rl, lw, ll, c, b, eps: sigmoid(b * rw) + 1 - sigmoid(b * (rw - rl)),
    "sft": lambda rw, rl, lw, ll, c, b, eps: -c / lw,
}


def reference(name, eps=0.0):
    return [
        REFERENCE[name](rw, rl, lw, ll, c, BETA, eps)
        for rw, rl, lw, ll, c in zip(R_W, R_L, LEN_CHOSEN, LEN_REJECTED, CHOSEN)
    ]


def ours(name, eps=0.0):
    return dpo_loss(
        t(CHOSEN),
        t(REJECTED),
        t(REF_CHOSEN),
        t(REF_REJECTED),
        t(LEN_CHOSEN),
        t(LEN_REJECTED),
        beta=BETA,
        loss_type=[name],
        label_smoothing=eps,
    )


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_loss_type_matches_the_independent_reference(name):
    eps = 0.1 if name in ("sigmoid", "robust") else 0.0
    torch.testing.assert_close(ours(name, eps), t(reference(name, eps)), rtol=0, atol=F64_TOL)


def test_sigmoid_hand_numbers():
    """-log sigmoid(z) = log(1 + e^-z) for z = [0.5, -0.25, -1.0]: [0.474077, 0.825939, 1.313262]."""
    got = dpo_sigmoid_loss(t(R_W), t(R_L), BETA)
    torch.testing.assert_close(got, t([0.4740769841801067, 0.8259394198788436, 1.3132616875182228]))


def test_ipo_hand_numbers():
    """Length-normalised: r_w/|y_w| - r_l/|y_l| = [0.5/2 + 0.5/1, 0 - 0.5/2, -1/1 - 1/5] = [0.75, -0.25, -1.2];
    minus 1/(2 beta) = 1 gives [-0.25, -1.25, -2.2], squared [0.0625, 1.5625, 4.84]."""
    got = ipo_loss(t(R_W), t(R_L), t(LEN_CHOSEN), t(LEN_REJECTED), BETA)
    torch.testing.assert_close(got, t([0.0625, 1.5625, 4.84]))


def test_hinge_and_sppo_hand_numbers():
    """hinge: relu(1 - z) = [0.5, 1.25, 2.0].
    sppo_hard: (r_w - 1)^2 + (r_l + 1)^2 = [0.25 + 0.25, 1 + 2.25, 4 + 4] = [0.5, 3.25, 8.0]."""
    torch.testing.assert_close(hinge_loss(t(R_W), t(R_L), BETA), t([0.5, 1.25, 2.0]))
    torch.testing.assert_close(sppo_hard_loss(t(R_W), t(R_L), BETA), t([0.5, 3.25, 8.0]))


def test_sft_is_a_per_pair_token_mean():
    """-logps / length: [1/2, 2/4, 3/1] = [0.5, 0.5, 3.0]; an empty completion counts as length 1."""
    torch.testing.assert_close(sft_loss(t(CHOSEN), t(LEN_CHOSEN)), t([0.5, 0.5, 3.0]))
    torch.testing.assert_close(sft_loss(t([-2.0]), t([0])), t([2.0]))


def test_policy_equal_to_reference_gives_the_known_constants():
    """r_w = r_l = 0: sigmoid, robust, = log 2; nca = bco = 2 log 2; hinge, apo_* = 1;
    ipo = (1/(2 beta))^2 = 1; sppo_hard = 2 (1/(2 beta))^2 = 2."""
    zero = torch.zeros(2, dtype=torch.float64)
    lengths = t([3, 5])
    expected = {
        dpo_sigmoid_loss: math.log(2),
        bco_pair_loss: 2 * math.log(2),
        nca_pair_loss: 2 * math.log(2),
        hinge_loss: 1.0,
        apo_zero_loss: 1.0,
        apo_down_loss: 1.0,
        sppo_hard_loss: 2.0,
    }
    for fn, value in expected.items():
        torch.testing.assert_close(fn(zero, zero, BETA), t([value, value]), msg=fn.__name__)
    torch.testing.assert_close(robust_loss(zero, zero, BETA, 0.2), t([math.log(2)] * 2))
    torch.testing.assert_close(ipo_loss(zero, zero, lengths, lengths, BETA), t([1.0, 1.0]))


def test_label_smoothing_limits():
    """eps = 0: robust and cDPO are plain DPO. cDPO is symmetric: l_eps(z) = l_{1-eps}(-z)."""
    plain = dpo_sigmoid_loss(t(R_W), t(R_L), BETA)
    torch.testing.assert_close(robust_loss(t(R_W), t(R_L), BETA, 0.0), plain)
    torch.testing.assert_close(dpo_sigmoid_loss(t(R_W), t(R_L), BETA, 0.0), plain)
    a = dpo_sigmoid_loss(t(R_W), t(R_L), BETA, 0.2)
    b = dpo_sigmoid_loss(t(R_L), t(R_W), BETA, 0.8)
    torch.testing.assert_close(a, b)


def test_beta_to_zero_makes_sigmoid_log_two():
    """z = beta (r_w - r_l) -> 0 as beta -> 0, so every pair tends to log 2 whatever the log-ratios."""
    got = dpo_sigmoid_loss(t(R_W), t(R_L), 1e-9)
    torch.testing.assert_close(got, t([math.log(2)] * 3))  # |z| / 2 <= 1e-9 away, inside the 1e-7 default


def test_weighted_combination_and_rpo_alpha():
    """loss_weights scale each term; rpo_alpha adds alpha * sft; the default weights are 1.0 each."""
    args = (t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(LEN_CHOSEN), t(LEN_REJECTED))
    combo = dpo_loss(*args, beta=BETA, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    expected = [0.8 * s + 0.2 * b + f for s, b, f in zip(reference("sigmoid"), reference("bco_pair"), reference("sft"))]
    torch.testing.assert_close(combo, t(expected))
    rpo = dpo_loss(*args, beta=BETA, rpo_alpha=0.5)
    torch.testing.assert_close(rpo, t([s + 0.5 * f for s, f in zip(reference("sigmoid"), reference("sft"))]))
    unweighted = dpo_loss(*args, beta=BETA, loss_type=["sigmoid", "hinge"])
    torch.testing.assert_close(unweighted, t([s + h for s, h in zip(reference("sigmoid"), reference("hinge"))]))


def test_unknown_loss_type_names_the_choices():
    args = (t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(LEN_CHOSEN), t(LEN_REJECTED))
    with pytest.raises(ValueError, match=r"unknown loss_type 'exo'.*sigmoid"):
        dpo_loss(*args, loss_type=["exo"])


def test_gradient_sign_raises_chosen_and_lowers_rejected():
    """d loss / d chosen_logps < 0 and d loss / d rejected_logps > 0 for the sigmoid loss."""
    chosen, rejected = t(CHOSEN).requires_grad_(), t(REJECTED).requires_grad_()
    dpo_loss(
        chosen, rejected, t(REF_CHOSEN), t(REF_REJECTED), t(LEN_CHOSEN), t(LEN_REJECTED), beta=BETA
    ).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_losses_are_the_config_choices_and_named_public_functions():
    """One way to pick a variant: DPOConfig.loss_type lists exactly LOSSES' names, each a named, exported function."""
    from posttrain_dpo.config import LossType

    assert typing.get_args(LossType) == tuple(LOSSES) == posttrain_dpo.LOSS_TYPES
    for name, fn in LOSSES.items():
        assert getattr(posttrain_dpo, fn.__name__) is fn and fn.__name__.endswith("_loss"), name
