"""Fixtures for posttrain-reward's tests: a tiny model directory and synthetic preference rows."""

from __future__ import annotations

import random

import pytest


def pytest_configure(config):
    # the kit marks its checks; registered here too so --strict-markers passes without `-p posttrain.testing.kit`
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def keyword_pairs(seed: int, n: int) -> list[dict]:
    """Explicit-prompt pairs where the chosen answer contains the word "good" and the rejected one does not."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefhijklmnpqrstuvwxyz") for _ in range(rng.randint(2, 4)))

    rows = []
    for _ in range(n):
        chosen = [word(), word()]
        chosen.insert(rng.randint(0, 2), "good")
        rows.append(
            {
                "prompt": f"Q: {word()}\nA:",
                "chosen": " " + " ".join(chosen),
                "rejected": " " + " ".join(word() for _ in range(3)),
            }
        )
    return rows


@pytest.fixture(scope="session")
def reward_keyword_pairs():
    return keyword_pairs


@pytest.fixture(scope="session")
def reward_tiny_model(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("reward-tiny") / "model")


@pytest.fixture(scope="session")
def reward_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()
