"""Guess the number: the secret, the feedback, the per-turn penalty."""

from __future__ import annotations

import pytest
from posttrain.environments import Turn
from posttrain_envs import GuessNumber


def guess(env: GuessNumber, text: str):
    return env.step(Turn(text=text, content=text))


def test_feedback_and_rewards_for_a_row_with_a_secret():
    env = GuessNumber()
    env.reset({"prompt": "guess", "secret": 42}, seed=0)
    low, high, hit = guess(env, "50"), guess(env, "I say 30"), guess(env, "42")
    assert (low.observation, low.reward, low.done) == ("lower", -0.05, False)
    assert (high.observation, high.done) == ("higher", False)
    assert hit.done and hit.reward == 1.0 and hit.metrics == {"solved": 1.0, "guesses": 3.0}


def test_a_turn_without_a_number_gets_the_rules_and_no_penalty():
    env = GuessNumber(low=1, high=10)
    env.reset({"prompt": "guess"}, seed=0)
    step = guess(env, "hmm")
    assert step.observation == "Answer with one whole number between 1 and 10." and step.reward is None


def test_the_secret_comes_from_the_seed_when_the_row_has_none():
    secrets = []
    for seed in range(20):
        env = GuessNumber(low=1, high=100)
        env.reset({"prompt": "guess"}, seed=seed)
        secrets.append(env.secret)
    again = GuessNumber(low=1, high=100)
    again.reset({"prompt": "guess"}, seed=3)
    assert again.secret == secrets[3] and len(set(secrets)) > 10 and all(1 <= s <= 100 for s in secrets)


def test_an_empty_range_is_refused():
    with pytest.raises(ValueError, match="low"):
        GuessNumber(low=5, high=1)
