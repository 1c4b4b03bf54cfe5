"""Guess the number: a multi-turn game with higher/lower feedback, where planning across turns pays.

The environment picks a secret integer in ``[low, high]`` (the row's ``secret`` column when it has one, else one
drawn from the episode's seed). Each turn the model guesses; the environment answers ``higher``, ``lower`` or
ends the episode on a hit. The reward is 1.0 for the hit minus ``turn_penalty`` for each guess before it, so
binary search earns more than counting up; a turn without a number is answered with the rules.
"""

from __future__ import annotations

import random
import re
from typing import Any

from posttrain.environments import Step, Turn

_INTEGER = re.compile(r"-?\d+")


class GuessNumber:
    """Find a secret integer in ``[low, high]`` from higher/lower feedback; rows hold ``prompt`` (and ``secret``).

    Args:
        low, high: the range of the secret (inclusive).
        turn_penalty: subtracted for each guess that misses, as a per-turn reward.
    """

    def __init__(self, low: int = 1, high: int = 100, turn_penalty: float = 0.05):
        if low > high:
            raise ValueError(f"low ({low}) must not exceed high ({high})")
        self.low, self.high, self.turn_penalty = low, high, turn_penalty
        self.secret = low
        self.guesses = 0

    def reset(self, row: dict[str, Any], seed: int) -> None:
        secret = row.get("secret")
        self.secret = int(secret) if secret is not None else random.Random(seed).randint(self.low, self.high)
        self.guesses = 0
        return None

    def step(self, turn: Turn) -> Step:
        found = _INTEGER.findall(turn.content)
        if not found:
            return Step(observation=f"Answer with one whole number between {self.low} and {self.high}.")
        guess = int(found[-1])
        self.guesses += 1
        if guess == self.secret:
            return Step(reward=1.0, done=True, metrics={"solved": 1.0, "guesses": float(self.guesses)})
        return Step(observation="higher" if guess < self.secret else "lower", reward=-self.turn_penalty)
