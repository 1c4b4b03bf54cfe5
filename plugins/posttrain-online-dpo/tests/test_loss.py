"""Online DPO's ranking and losses on hand-made tensors; expected values derived in the docstrings."""

from __future__ import annotations

import math

import pytest
import torch
from posttrain_online_dpo import dpo_sigmoid_loss, ipo_loss, online_dpo_loss, pair_rows, preference_from_scores

NAN = float("nan")

# Three pairs: (policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs.
#   pair 0: r_w = -4 - (-5) = 1,  r_l = -6 - (-5) = -1  -> h = 2
#   pair 1: policy == reference                          -> h = 0
#   pair 2: r_w = -6 - (-5) = -1, r_l = -4 - (-5) = 1   -> h = -2
CHOSEN, REJECTED = [-4.0, -3.0, -6.0], [-6.0, -7.0, -4.0]
REF_CHOSEN, REF_REJECTED = [-5.0, -3.0, -5.0], [-5.0, -7.0, -5.0]


def logps():
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    rejected = torch.tensor(REJECTED, requires_grad=True)
    return chosen, rejected, torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED)


def test_sigmoid_loss_and_its_gradient_by_hand():
    """beta = 0.5, z = beta * h = (1, 0, -1); loss = -log sigmoid(z) = log(1 + e^-z):
    log(1 + e^-1) = 0.3132617, log 2 = 0.6931472, log(1 + e) = 1.3132617; sum 2.3196706 over 3 ranked pairs.
    d loss / d logp_w = -beta * sigmoid(-z) = (-0.5 * 0.2689414, -0.25, -0.5 * 0.7310586); d / d logp_l is its negative.
    """
    chosen, rejected, ref_chosen, ref_rejected = logps()
    loss_sum, n, per_pair = online_dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, torch.ones(3, dtype=torch.bool), beta=0.5
    )
    torch.testing.assert_close(per_pair.detach(), torch.tensor([0.3132617, 0.6931472, 1.3132617]))
    assert float(loss_sum.detach()) == pytest.approx(2.3196706, abs=1e-6) and int(n) == 3
    loss_sum.backward()
    expected = torch.tensor([-0.1344707, -0.25, -0.3655293])
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_ipo_loss_pulls_the_margin_to_one_over_two_beta():
    """(h - 1/(2 beta))^2 with h = (2, 0, -2). beta = 0.5: target 1 -> (1, 1, 9). beta = 0.25: target 2 -> (0, 4, 16).
    d / d logp_w = 2 (h - target): beta = 0.25 gives (0, -4, -8)."""
    chosen, rejected, ref_chosen, ref_rejected = logps()
    ranked = torch.ones(3, dtype=torch.bool)
    _, _, per_pair = online_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, ranked, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(per_pair.detach(), torch.tensor([1.0, 1.0, 9.0]))
    loss_sum, _, per_pair = online_dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, ranked, beta=0.25, loss_type="ipo"
    )
    torch.testing.assert_close(per_pair.detach(), torch.tensor([0.0, 4.0, 16.0]))
    loss_sum.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -4.0, -8.0]))


def test_ipo_uses_sequence_log_ratios_not_per_token_means():
    """Unlike posttrain-dpo's ipo, no length normalisation: only the summed log-ratios enter (h = 3 - 1 = 2)."""
    out = ipo_loss(torch.tensor([3.0]), torch.tensor([1.0]), beta=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0]))


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 2.0])
def test_policy_equal_to_reference_gives_the_known_constants(beta):
    """h = 0 for every pair: sigmoid gives log 2 whatever beta (so beta -> 0 leaves log 2), ipo gives 1/(4 beta^2)."""
    x = torch.tensor([-3.0, -9.5])
    ranked = torch.ones(2, dtype=torch.bool)
    _, _, sigmoid = online_dpo_loss(x, x.flip(0), x, x.flip(0), ranked, beta=beta)
    _, _, ipo = online_dpo_loss(x, x.flip(0), x, x.flip(0), ranked, beta=beta, loss_type="ipo")
    torch.testing.assert_close(sigmoid, torch.full((2,), math.log(2)))
    torch.testing.assert_close(ipo, torch.full((2,), 1 / (4 * beta**2)))


def test_sigmoid_matches_an_independent_scalar_implementation():
    """Random log-probs: each pair's loss equals log(1 + exp(-beta * h)) computed in float64 with math."""
    gen = torch.Generator().manual_seed(0)
    c, r, rc, rr = (-10 * torch.rand(16, generator=gen) for _ in range(4))
    per_pair = dpo_sigmoid_loss(c - rc, r - rr, beta=0.3)
    expected = [math.log1p(math.exp(-0.3 * ((a - b) - (x - y)))) for a, b, x, y in zip(c, r, rc, rr)]
    torch.testing.assert_close(per_pair.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_unranked_pairs_carry_no_loss_no_gradient_and_are_not_counted():
    """Pair 1 is unranked and holds -inf log-probs (anything at all): loss = pair 0 + pair 2 of the sigmoid
    test (0.3132617 + 1.3132617 = 1.6265234) over n = 2, and pair 1 gets exactly zero gradient."""
    chosen, rejected, ref_chosen, ref_rejected = logps()
    with torch.no_grad():
        rejected[1] = -math.inf
    ranked = torch.tensor([True, False, True])
    loss_sum, n, _ = online_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, ranked, beta=0.5)
    assert float(loss_sum.detach()) == pytest.approx(1.6265234, abs=1e-6) and int(n) == 2
    loss_sum.backward()
    assert chosen.grad[1] == 0.0 and rejected.grad[1] == 0.0 and torch.isfinite(chosen.grad).all()


def test_scores_rank_pairs_higher_wins_ties_go_to_the_first_missing_scores_leave_a_pair_unranked():
    """Scores of 4 pairs: (1, 0) first wins -> 0; (0, 1) -> 1; (2, 2) tie -> first (TRL: first >= second);
    (NaN, 1): a sample no reward scored -> NaN (unranked)."""
    winner = preference_from_scores(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, NAN, 1.0]))
    torch.testing.assert_close(winner, torch.tensor([0.0, 1.0, 0.0, NAN]), equal_nan=True)


def test_pair_rows_index_the_chosen_and_the_rejected_sample():
    """Pairs are rows (0, 1), (2, 3), (4, 5), (6, 7). Winner 0 keeps the order, 1 swaps it, NaN keeps it."""
    chosen, rejected = pair_rows(torch.tensor([0.0, 1.0, 0.0, NAN]))
    assert chosen.tolist() == [0, 3, 4, 6] and rejected.tolist() == [1, 2, 5, 7]


def test_metrics_by_hand():
    """Two pairs, samples [chosen 0, chosen 1; rejected 0, rejected 1], beta = 0.5.
    log π = (-4, -3, -6, -7), log π_ref = (-5, -4, -5, -7) -> kl = log π/π_ref = (1, 1, -1, 0), Σ = 1.
    Implicit rewards β·kl: chosen (0.5, 0.5), rejected (-0.5, 0): margins (1, 0.5) -> mean 0.75, both positive.
    Scores (1, 2, 0, 2): mean 5/4; chosen − rejected (1, 0) -> margin 0.5, one tie of two; rlhf = (5 − 0.5·1)/4.
    With pair 1 unranked the pair metrics cover pair 0 alone."""
    from posttrain_online_dpo import online_dpo_metrics

    logps, ref = torch.tensor([-4.0, -3.0, -6.0, -7.0]), torch.tensor([-5.0, -4.0, -5.0, -7.0])
    truncated, scores = torch.tensor([False, True, False, False]), torch.tensor([1.0, 2.0, 0.0, 2.0])

    def means(ranked):
        stats = online_dpo_metrics(logps, ref, torch.tensor(ranked), truncated, 0.5, scores)
        return {k: float(num) / float(den) for k, (num, den) in stats.items()}

    m = means([True, True])
    expected = {
        "rewards/chosen": 0.5,
        "rewards/rejected": -0.25,
        "rewards/margins": 0.75,
        "rewards/accuracies": 1.0,
        "logps/chosen": -3.5,
        "logps/rejected": -6.5,
        "objective/kl": 0.25,
        "objective/entropy": 5.0,
        "objective/non_score_reward": -0.125,
        "val/contain_eos_token": 0.75,
        "pairs/ranked_fraction": 1.0,
        "objective/scores": 1.25,
        "objective/scores_margin": 0.5,
        "objective/rlhf_reward": 1.125,
        "pairs/tie_fraction": 0.5,
    }
    assert m == pytest.approx(expected)
    one = means([True, False])
    assert one["rewards/margins"] == 1.0 and one["pairs/ranked_fraction"] == 0.5 and one["pairs/tie_fraction"] == 0.0
    assert one["objective/kl"] == 0.25  # sample metrics still cover every sample
