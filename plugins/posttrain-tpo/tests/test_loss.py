"""TPO losses: hand-computed values for every loss_type, limiting cases, and the method's loss on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain.config import build_config
from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance
from posttrain_tpo import LOSSES, TPO, TPOConfig, hinge_loss, ipo_loss, reference_nll, tpo_l_loss, tpo_loss

CHOSEN, REJECTED = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -3.0])  # delta = chosen - rejected = [1, -3]
# Hand values are printed to 6 decimals (off by <= 5e-7); the loss functions are float32, a few rounded operations on
# numbers <= 16 (~1e-5 at most, relative ~1e-6): assert_close's float32 defaults (atol 1e-5, rtol 1.3e-6) cover
# both, and a formula error (a missing beta, the wrong sign or normalisation) moves the values by 1e-2 or more.


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_hand_computed():
    """beta = 0.5: beta * delta = [0.5, -1.5]; -log sigmoid(z) = softplus(-z) = [0.474077, 1.701413].
    With label_smoothing 0.1: 0.9 softplus(-z) + 0.1 softplus(z) = [0.524077, 1.551413]."""
    torch.testing.assert_close(tpo_loss(CHOSEN, REJECTED, 0.5), torch.tensor([0.474077, 1.701413]))
    torch.testing.assert_close(tpo_loss(CHOSEN, REJECTED, 0.5, 0.1), torch.tensor([0.524077, 1.551413]))


def test_hinge_and_ipo_hand_computed():
    """beta = 0.5. hinge: relu(1 - [0.5, -1.5]) = [0.5, 2.5]. ipo: (delta - 1/(2 beta))^2 = (1-1)^2, (-3-1)^2 = [0, 16]."""
    torch.testing.assert_close(hinge_loss(CHOSEN, REJECTED, 0.5), torch.tensor([0.5, 2.5]))
    torch.testing.assert_close(ipo_loss(CHOSEN, REJECTED, 0.5), torch.tensor([0.0, 16.0]))


def test_tpo_l_hand_computed():
    """Mean log-probs chosen [-1, -2], rejected [-1.5, -1], beta 2, gamma 0.5: z = beta * delta - gamma = [0.5, -2.5];
    softplus(-z) = [0.474077, 2.578890]. gamma = 0 reduces TPO-L to the sigmoid loss."""
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(tpo_l_loss(c, r, 2.0, 0.5), torch.tensor([0.474077, 2.578890]))
    torch.testing.assert_close(tpo_l_loss(c, r, 2.0, 0.0), tpo_loss(c, r, 2.0))


def test_reference_nll_is_a_per_token_mean():
    """Sums [-6, -2] over [3, 4] tokens -> [2, 0.5]; an empty (fully truncated) completion gives 0, not NaN."""
    torch.testing.assert_close(
        reference_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])), torch.tensor([2.0, 0.5])
    )
    assert reference_nll(torch.tensor([0.0]), torch.tensor([0])).item() == 0.0


def test_limits():
    """Equal log-probs: sigmoid = ln 2 (label smoothing or not), hinge = 1, ipo = 1/(4 beta^2)."""
    x = torch.tensor([-3.0, -7.0])
    torch.testing.assert_close(tpo_loss(x, x, 0.01, 0.2), torch.full((2,), math.log(2.0)))
    torch.testing.assert_close(hinge_loss(x, x, 0.1), torch.ones(2))
    torch.testing.assert_close(ipo_loss(x, x, 0.1), torch.full((2,), 25.0))
    assert tpo_loss(torch.tensor([100.0]), torch.tensor([0.0]), 1.0).item() < 1e-20


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_losses_dict_calls_each_function_with_the_shared_keywords(loss_type):
    """TPOConfig.loss_type lists exactly LOSSES' names; each function takes the shared keywords and uses its own."""
    import typing

    from posttrain_tpo.config import LossType

    assert typing.get_args(LossType) == tuple(LOSSES)
    functions = {
        "sigmoid": lambda: tpo_loss(CHOSEN, REJECTED, 0.5, 0.1),
        "hinge": lambda: hinge_loss(CHOSEN, REJECTED, 0.5),
        "ipo": lambda: ipo_loss(CHOSEN, REJECTED, 0.5),
        "tpo-l": lambda: tpo_l_loss(CHOSEN, REJECTED, 0.5, 0.3, 0.1),
    }
    got = LOSSES[loss_type](chosen_logps=CHOSEN, rejected_logps=REJECTED, beta=0.5, gamma=0.3, label_smoothing=0.1)
    torch.testing.assert_close(got, functions[loss_type]())


def _logps_tolerance(logps: float, n_tokens: int) -> float:
    """How far the method's float32 log-prob of a sequence, scored in a padded batch, may round away from this
    unpadded recomputation: n token log-probs out of a forward pass, of size |log p| plus the logit scale ~1 per
    token (posttrain.testing._rounding.rounding_tolerance). A padding token scored moves it by ~4 nats."""
    return rounding_tolerance(abs(logps) + n_tokens, LOGPROB_ROUNDINGS + n_tokens)


def _manual(model, prompt_ids, completion_ids) -> tuple[float, int]:
    """Independent: the unpadded sequence alone; (sum of completion log-probs, number of completion tokens)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total = sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))
    return total, len(completion_ids)


ROWS = [
    {"prompt": "Hi ", "chosen": "there", "rejected": "no", "reference": "you!"},
    {"prompt": "Count: ", "chosen": "123", "rejected": "12345", "reference": "1"},
]


@pytest.mark.parametrize(("loss_type", "alpha"), [("sigmoid", 1.0), ("tpo-l", 0.5), ("ipo", 0.0)])
def test_method_loss_matches_independent_computation(tpo_ctx, loss_type, alpha):
    """loss_sum = sum over triples of preference(chosen, rejected) + alpha * (-ref_sum / ref_tokens), with summed
    log-probs for sigmoid and per-token means for tpo-l/ipo; n_items = number of triples."""
    tpo_ctx.config = build_config(TPOConfig, {"loss_type": loss_type, "tpo_alpha": alpha, "beta": 0.5})
    method = TPO()
    rows = method.prepare(ROWS, tpo_ctx)
    batch = method.collate(rows, tpo_ctx)
    assert batch["input_ids"].shape[0] == (3 if alpha else 2) * len(ROWS)
    expected, tolerance = 0.0, 0.0
    for row in rows:
        (c, nc), (r, nr), (ref, nref) = (
            _manual(tpo_ctx.model, row["prompt_ids"], row[f"{k}_ids"]) for k in ("chosen", "rejected", "reference")
        )
        tc, tr, tref = _logps_tolerance(c, nc), _logps_tolerance(r, nr), _logps_tolerance(ref, nref)
        # each term moves by at most its slope times the log-probs' tolerances (softplus's slope is <= 1)
        if loss_type == "sigmoid":
            expected += softplus(-0.5 * (c - r))
            tolerance += 0.5 * (tc + tr)
        elif loss_type == "tpo-l":
            expected += softplus(-(0.5 * (c / nc - r / nr) - 0.5))
            tolerance += 0.5 * (tc / nc + tr / nr)
        else:
            expected += (c / nc - r / nr - 1 / (2 * 0.5)) ** 2
            tolerance += 2 * abs(c / nc - r / nr - 1) * (tc / nc + tr / nr) + (tc / nc + tr / nr) ** 2
        expected += alpha * (-ref / nref)
        tolerance += alpha * tref / nref
    out = method.loss(tpo_ctx.model, batch, tpo_ctx)
    assert out.n_items == 2
    assert out.loss_sum.item() == pytest.approx(expected, rel=0, abs=tolerance)
    assert ("nll_loss" in out.metrics) == (alpha != 0)
