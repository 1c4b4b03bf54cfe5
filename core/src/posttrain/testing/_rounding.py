"""Float rounding bounds for this repository's numerical tests (private: may change in any release).

A test that compares two computations of one float quantity (a batch and its rows one by one, padded less and
more, a formula against a hand value) needs a tolerance that follows from the dtype and the order of the
reductions, not from one machine's run:

- every rounded operation is off by at most u = eps / 2 of its result (float32: u = 2**-24 = 6.0e-8);
- a result built from N rounded operations, each on numbers of size at most M, is then off by at most
  lambda * sqrt(N) * u * M with probability at least 1 - 2 exp(-lambda^2 / 2) when the rounding errors are
  independent with mean zero (Higham and Mary, "A new approach to probabilistic rounding error analysis",
  SIAM J. Sci. Comput. 41(5), 2019). lambda = 8 makes that 1 - 3e-14. The worst case N * u is reached only by
  contrived inputs;
- two computations of one quantity may each be off by that much, in opposite directions: hence a factor 2.

Each test states what it counts (operations, sizes) in a comment, and why a plausible bug moves the compared
numbers by far more than the bound.
"""

from __future__ import annotations

import math

ROUNDING_LAMBDA = 8.0
FLOAT32_U = 2.0**-24  # unit roundoff: half the distance from 1.0 to the next float32
FLOAT64_U = 2.0**-53
#: Rounded operations behind one token's log-prob out of the tiny Llama models of the tests (hidden 32-48,
#: 2 layers, <= 128 positions, ~100 tokens), counted as the terms of every sum and dot product on its path.
#: Per layer: input norm, q/k/v, output projection, second norm, gate/up projections (5 x 48), q.k over a head
#: (12), softmax and weighted sum over positions (2 x 128), down projection (96): 604; two layers, the final norm
#: and LM head (2 x 48) and the log-softmax over the vocabulary (100): 1404. Rounded up.
LOGPROB_ROUNDINGS = 1500
#: Size of the numbers behind one item's loss besides the loss itself (log-probs of a few nats, or beta-weighted
#: differences of sequence log-probs), which holds for the tests' short rows and tiny models.
ITEM_SCALE = 10.0


def rounding_tolerance(magnitude, roundings: int, u: float = FLOAT32_U, sides: int = 2):
    """How far two computations of one float quantity may differ through rounding alone (see above).

    Args:
        magnitude: sum of the absolute sizes of the numbers rounded on the way (for a sum of same-sign terms out of
            a model, the sum's own size plus the logit scale, ~1, of each term); a float or a tensor.
        roundings: rounded operations behind the quantity: ``LOGPROB_ROUNDINGS`` per log-prob out of a tiny model
            plus the terms of the final sum; for a few elementwise operations, their number.
        u: unit roundoff of the dtype: ``FLOAT32_U`` or ``FLOAT64_U``.
        sides: 2 when both values are rounded computations; 1 against an exact (or float64) reference.

    Returns:
        ``sides * ROUNDING_LAMBDA * sqrt(roundings) * u * magnitude``.
    """
    return sides * ROUNDING_LAMBDA * math.sqrt(max(roundings, 1)) * u * magnitude


def loss_tolerance(a: float, b: float, n_terms: int) -> float:
    """Tolerance for two logged losses (per-item means) of one step, computed in different groupings.

    Each is a sum of up to ``n_terms`` items out of forward passes, divided by their count: magnitude ``|loss| +
    ITEM_SCALE`` per unit of the mean.
    """
    return rounding_tolerance(max(abs(a), abs(b)) + ITEM_SCALE, LOGPROB_ROUNDINGS + n_terms)
