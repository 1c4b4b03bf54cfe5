"""CPO loss variants against hand-computed values, the config's cross-field checks, and the method's wiring."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from posttrain import ConfigError, Metric, TrainContext
from posttrain.config import build_config
from posttrain.testing._rounding import rounding_tolerance
from posttrain_cpo import (
    CPO,
    LOSSES,
    CPOConfig,
    alphapo_loss,
    alphapo_rewards,
    cpo_loss,
    hinge_loss,
    ipo_loss,
    simpo_loss,
)
from posttrain_cpo.data import collate_pairs

# Tolerances. Hand values are exact (math in float64) or printed to 7 digits (off by <= 5e-7). Ours are float32:
# a loss function is <= 10 rounded operations on numbers of size <= 3, off by <= 4.5e-6 (ATOL); the method's loss on
# the bigram stub is <= 50 (METHOD_ATOL, 1e-5); the same loss grouped two ways may round apart by twice that
# (GROUPING_TOL); the hinge and ipo values here are exact in binary. See posttrain.testing._rounding. A formula error
# (a missing beta, a sum for a mean, a padding token scored) moves them by 1e-2 or more.
ATOL = 5e-7 + rounding_tolerance(3.0, 10, sides=1)
METHOD_ATOL = 5e-7 + rounding_tolerance(3.0, 50, sides=1)
GROUPING_TOL = rounding_tolerance(4.0, 50)

SUMS_C, SUMS_R = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0])  # differences +1 and -1


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_cpo_sigmoid_loss_with_label_smoothing():
    """beta 0.1, differences +-1: -log s(0.1) = softplus(-0.1) = 0.6443967, -log s(-0.1) = 0.7443967.

    eps 0.2: pair 1 = 0.8 * 0.6443967 + 0.2 * 0.7443967 = 0.6643967; pair 2 = 0.8 * 0.7443967 + 0.2 * 0.6443967
    = 0.7243967. With eps 0 the loss is softplus(-0.1 * difference), and equal log-probs give log 2.
    """
    assert cpo_loss(SUMS_C, SUMS_R, 0.1, 0.2).tolist() == pytest.approx([0.6643967, 0.7243967], abs=ATOL)
    assert cpo_loss(SUMS_C, SUMS_R, 0.1).tolist() == pytest.approx([softplus(-0.1), softplus(0.1)], abs=ATOL)
    assert cpo_loss(SUMS_C, SUMS_C).tolist() == pytest.approx([math.log(2)] * 2, abs=ATOL)


def test_hinge_loss():
    """max(0, 1 - beta * d): beta 0.5 gives [0.5, 1.5]; beta 2 gives [0 (margin met), 3]."""
    assert hinge_loss(SUMS_C, SUMS_R, 0.5).tolist() == [0.5, 1.5]
    assert hinge_loss(SUMS_C, SUMS_R, 2.0).tolist() == [0.0, 3.0]


def test_ipo_loss():
    """(d - 1/(2 beta))^2 with beta 0.25, target 2: (1 - 2)^2 = 1 and (-1 - 2)^2 = 9."""
    assert ipo_loss(SUMS_C, SUMS_R, 0.25).tolist() == [1.0, 9.0]


def test_simpo_loss():
    """Means c = [-1, -2], r = [-1.5, -1.5], beta 2, gamma 0.5: logits 2 * 0.5 - 0.5 = 0.5 and 2 * -0.5 - 0.5 = -1.5.

    loss = softplus(-logits) = [log(1 + e^-0.5), log(1 + e^1.5)] = [0.4740770, 1.7014133].
    """
    losses = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5]), beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([0.4740770, 1.7014133], abs=ATOL)


def test_alphapo_loss_and_reward_shape():
    """alpha 0.5, beta 2, gamma 0.5, means c = -1, r = -2.

    rewards (1 - p^-0.5) / 0.5 with p = e^logp: c -> 2 (1 - e^0.5) = -1.2974425, r -> 2 (1 - e^1) = -3.4365637;
    logits = 2 * 2.1391211 - 0.5 = 3.7782423; loss = softplus(-3.7782423) = 0.0226054.
    """
    assert alphapo_rewards(torch.tensor([-1.0, -2.0]), 0.5).tolist() == pytest.approx(
        [-1.2974425, -3.4365637], abs=ATOL
    )
    loss = alphapo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5, alpha=0.5)
    assert loss.item() == pytest.approx(0.0226054, abs=ATOL)


def test_alphapo_tends_to_simpo_as_alpha_goes_to_zero():
    c, r = torch.tensor([-0.7, -2.3]), torch.tensor([-1.1, -0.4])
    assert torch.equal(alphapo_rewards(c, 0.0), c)  # alpha 0 is log p itself: exact
    # (1 - p^-alpha) / alpha = log p + alpha (log p)^2 / 2 + ...: 2.7e-6 away at alpha 1e-6 for |log p| <= 2.3,
    # plus a few float32 roundings; 1e-5 is above both and far below alpha = 0.5's effect (~0.5)
    assert torch.allclose(alphapo_rewards(c, 1e-6), c, atol=1e-5)
    assert torch.allclose(alphapo_loss(c, r, 2.0, 0.5, 1e-6), simpo_loss(c, r, 2.0, 0.5), atol=1e-5)


def test_config_nll_weight_and_cross_field_problems():
    assert CPOConfig().nll_weight == 1.0
    assert CPOConfig(loss_type="alphapo").nll_weight == 0.0
    assert CPOConfig(loss_type="alphapo", cpo_alpha=1.0).nll_weight == 1.0
    with pytest.raises(ConfigError) as err:
        build_config(CPOConfig, {"loss_type": "hinge", "label_smoothing": 0.1, "alpha": 0.3, "beta": 0.0})
    text = str(err.value)
    assert "3 problems" in text and "label_smoothing=0.1" in text and "alpha=0.3" in text and "beta must be > 0" in text
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        build_config(CPOConfig, {"loss_type": "simpoo"})


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
PAIR_1 = {"prompt_ids": [1, 1], "chosen_ids": [2, 2], "rejected_ids": [3, 3]}
PAIR_2 = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 3, 2]}


class BigramModel(torch.nn.Module):
    """Next-token distribution depends on the current token only: logits = log BIGRAM[input_ids]."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.log(BIGRAM)[input_ids])


def _loss(rows, **fields):
    ctx = TrainContext(config=build_config(CPOConfig, fields), tokenizer=SimpleNamespace(pad_token_id=0))
    return CPO().loss(BigramModel(), collate_pairs(rows, pad_token_id=0), ctx)


def _logged(*outputs, name):
    """What the loop logs for metric ``name`` over these micro-batches: a pair mean, sum over count."""
    metrics = [out.metrics[name] for out in outputs]
    assert all(isinstance(m, Metric) and m.kind == "ratio" for m in metrics), name
    return sum(float(m.value) for m in metrics) / sum(float(m.denominator) for m in metrics)


def test_method_sigmoid_on_known_log_probs():
    """PAIR_1 = prompt 1 1, chosen 2 2, rejected 3 3 (completion tokens only are scored).

    chosen:   log P(2|1) + log P(2|2) = log 0.4 + log 0.5 = log 0.2;  rejected: log 0.3 + log 0.4 = log 0.12.
    sigmoid, beta 0.1: softplus(-0.1 * log(0.2 / 0.12)) = softplus(-0.0510826) = 0.6679320;
    NLL = -(log 0.4 + log 0.5) / 2 = 0.8047190 (token mean of the chosen completion), weight 1.
    """
    out = _loss([PAIR_1], beta=0.1)
    assert out.n_items == 1
    assert out.loss_sum.item() == pytest.approx(0.6679320 + 0.8047190, abs=METHOD_ATOL)
    assert _logged(out, name="logps/chosen") == pytest.approx(math.log(0.2), abs=ATOL)
    assert _logged(out, name="nll_loss") == pytest.approx(0.8047190, abs=ATOL)


def test_method_simpo_and_alphapo_use_token_means():
    """simpo, beta 2, gamma 0.5: means log(0.2)/2 = -0.8047190 and log(0.12)/2 = -1.0601318, logits
    2 * 0.2554128 - 0.5 = 0.0108256, loss softplus(-0.0108256) = 0.6877490, plus NLL 0.8047190 (weight 1).
    alphapo with alpha 0 is the same preference term and, by default, no NLL term.
    """
    simpo = _loss([PAIR_1], loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert simpo.loss_sum.item() == pytest.approx(0.6877490 + 0.8047190, abs=METHOD_ATOL)
    alphapo = _loss([PAIR_1], loss_type="alphapo", beta=2.0, simpo_gamma=0.5)
    assert alphapo.loss_sum.item() == pytest.approx(0.6877490, abs=METHOD_ATOL)


def test_method_sums_pairs_and_ignores_padding():
    """PAIR_2 (prompt 1, chosen 2, rejected 3 3 2): chosen log 0.4, rejected log(0.3 * 0.4 * 0.4) = log 0.048;
    sigmoid beta 0.1 gives softplus(-0.1 * log(0.4 / 0.048)) + NLL -log 0.4."""
    pair_2 = softplus(-0.1 * math.log(0.4 / 0.048)) - math.log(0.4)
    out = _loss([PAIR_1, PAIR_2], beta=0.1)
    assert out.n_items == 2
    assert out.loss_sum.item() == pytest.approx(0.6679320 + 0.8047190 + pair_2, abs=METHOD_ATOL)
    assert _logged(out, name="rewards/accuracies") == 1.0


def test_metrics_are_pair_means_that_pool_over_micro_batches():
    """Each metric is a sum over pairs with its pair count, so 1 + 2 pairs log what the 3 together do."""
    pair_3 = {"prompt_ids": [2], "chosen_ids": [3, 3], "rejected_ids": [1, 2]}
    whole = _loss([PAIR_1, PAIR_2, pair_3], beta=0.2)
    split = (_loss([PAIR_1], beta=0.2), _loss([PAIR_2, pair_3], beta=0.2))
    for name in whole.metrics:
        assert _logged(*split, name=name) == pytest.approx(_logged(whole, name=name), abs=GROUPING_TOL), name
    nll = [_logged(out, name="nll_loss") for out in split]
    assert abs(sum(nll) / 2 - _logged(whole, name="nll_loss")) > 1e-3  # a mean of means would differ


def test_losses_are_the_config_choices_called_with_one_set_of_keywords():
    """CPOConfig.loss_type lists exactly LOSSES' names; each takes the shared keywords and uses its own."""
    import typing

    from posttrain_cpo.config import LossType

    assert typing.get_args(LossType) == tuple(LOSSES)
    options = dict(beta=0.5, gamma=0.3, alpha=0.2, label_smoothing=0.1)
    c, r = SUMS_C / 4, SUMS_R / 4
    expected = {
        "sigmoid": cpo_loss(c, r, 0.5, 0.1),
        "hinge": hinge_loss(c, r, 0.5),
        "ipo": ipo_loss(c, r, 0.5),
        "simpo": simpo_loss(c, r, 0.5, 0.3, 0.1),
        "alphapo": alphapo_loss(c, r, 0.5, 0.3, 0.2, 0.1),
    }
    for name, fn in LOSSES.items():
        torch.testing.assert_close(fn(chosen_logps=c, rejected_logps=r, **options), expected[name], msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_every_loss_type_gives_a_finite_loss_and_gradient(loss_type):
    logits = torch.zeros(4, 4, requires_grad=True)

    class Learnable(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(logits=logits[input_ids])

    ctx = TrainContext(config=CPOConfig(loss_type=loss_type), tokenizer=SimpleNamespace(pad_token_id=0))
    out = CPO().loss(Learnable(), collate_pairs([PAIR_1, PAIR_2], pad_token_id=0), ctx)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and logits.grad.abs().sum() > 0
