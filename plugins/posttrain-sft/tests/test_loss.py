"""loss.py on hand-made tensors: every expected value is derived in the docstring. No model, milliseconds."""

from __future__ import annotations

import math

import torch
from posttrain.ops import token_logps
from posttrain.testing._rounding import rounding_tolerance
from posttrain_sft.loss import IGNORE_INDEX, dft_loss, nll_loss, shift_labels, token_metrics

# One row of 4 positions over a vocabulary of 3. Position t's logits score the token at t+1.
# log-probs: logits (0, ln 2, 0) -> p = (1/4, 1/2, 1/4); all-zero logits -> p = 1/3 each.
LOGITS = torch.tensor([[[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [5.0, -5.0, 0.0]]])
LABELS = torch.tensor([[IGNORE_INDEX, 1, 2, 0]])  # the first token is never a target
# The expected values are exact (float64 math); ours are float32 results of at most ~30 rounded operations (three
# log-softmaxes over 3 logits and a sum) on numbers of size <= 10, so they are off by at most 2.6e-5
# (posttrain.testing._rounding.rounding_tolerance). A formula error moves them by 0.1 or more (ln 2 for a dropped mask).
ATOL = rounding_tolerance(10.0, 30, sides=1)


def test_shift_labels_moves_targets_one_left_and_ignores_the_last_position():
    assert shift_labels(LABELS).tolist() == [[1, 2, 0, IGNORE_INDEX]]


def test_nll_loss_is_the_sum_of_token_cross_entropies():
    """Targets after the shift: position 0 -> token 1 (p=1/2), 1 -> token 2 (p=1/3), 2 -> token 0 (p=1/4); position
    3 predicts nothing. Sum = ln 2 + ln 3 + ln 4 = ln 24 over 3 loss tokens."""
    logps = token_logps(LOGITS, shift_labels(LABELS))
    assert torch.allclose(nll_loss(logps), torch.tensor(math.log(24.0)), rtol=0, atol=ATOL)
    assert logps[0, 3] == 0.0


def test_ignored_positions_change_nothing():
    """Changing the logits of the last position (no target) or a label that is -100 leaves the loss as it is."""
    logits = LOGITS.clone()
    logits[0, 3] = torch.tensor([-9.0, 9.0, 3.0])
    before = nll_loss(token_logps(LOGITS, shift_labels(LABELS)))
    after = nll_loss(token_logps(logits, shift_labels(LABELS)))
    assert torch.equal(before, after)  # the changed values are multiplied by 0 or never read: bitwise
    masked = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0]])  # drop target 1: ln 24 - ln 2 = ln 12
    assert torch.allclose(
        nll_loss(token_logps(LOGITS, shift_labels(masked))), torch.tensor(math.log(12.0)), rtol=0, atol=ATOL
    )


def test_dft_loss_weights_each_token_by_its_detached_probability():
    """DFT sum = -Σ p log p over targets: (1/2) ln 2 + (1/3) ln 3 + (1/4) ln 4 = ln 2 + (1/3) ln 3.
    Its gradient w.r.t. a token's log-prob is -p (p detached), against -1 for plain cross-entropy."""
    logps = token_logps(LOGITS, shift_labels(LABELS)).requires_grad_(True)
    loss = dft_loss(logps)
    assert torch.allclose(loss, torch.tensor(math.log(2) + math.log(3) / 3), rtol=0, atol=ATOL)
    loss.backward()
    expected = torch.tensor([[-1 / 2, -1 / 3, -1 / 4, -1.0]])  # position 3: exp(0) = 1 times a zero log-prob
    assert torch.allclose(logps.grad, expected, rtol=0, atol=ATOL)


def test_dft_equals_nll_when_the_model_is_certain():
    """p = 1 for every target: DFT's weight is 1, so both losses are 0; in the limit they agree."""
    logits = torch.full((1, 3, 3), -30.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 30.0
    logps = token_logps(logits, shift_labels(torch.tensor([[0, 1, 2]])))
    assert abs(float(dft_loss(logps)) - float(nll_loss(logps))) < 1e-6  # both are 0 to within e^-60


def test_token_metrics_count_accuracy_and_entropy_over_loss_tokens_only():
    """Targets 1, 2, 0 at positions 0-2. Argmax: position 0 -> 1 (correct), position 1 is a 3-way tie -> argmax
    picks index 0 (wrong, target 2), position 2 -> 1 (wrong, target 0): 1 correct of 3.
    Entropy: position 0 and 2 have p = (1/4, 1/2, 1/4): H = 1.5 ln 2 each; position 1: ln 3.
    Sum = 3 ln 2 + ln 3. Position 3 (no target) with its confident logits is not counted."""
    n, correct, entropy = token_metrics(LOGITS, shift_labels(LABELS))
    assert int(n) == 3 and int(correct) == 1
    assert torch.allclose(entropy, torch.tensor(3 * math.log(2) + math.log(3)), rtol=0, atol=ATOL)


def test_token_metrics_of_a_batch_without_loss_tokens_are_zero():
    n, correct, entropy = token_metrics(LOGITS, torch.full((1, 4), IGNORE_INDEX))
    assert (int(n), int(correct), float(entropy)) == (0, 0, 0.0)


def test_losses_are_the_config_choices():
    """One way to pick a variant: SFTConfig.loss_type lists exactly the names of loss.LOSSES."""
    import typing

    from posttrain_sft.config import LossType
    from posttrain_sft.loss import LOSSES

    assert typing.get_args(LossType) == tuple(LOSSES) and LOSSES == {"nll": nll_loss, "dft": dft_loss}
