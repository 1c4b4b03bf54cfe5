"""Fixtures for the posttrain-cpo tests: a tiny model and a synthetic preference task."""

from __future__ import annotations

import random

import pytest


def pytest_configure(config):
    # the kit marks its checks; registered here too so --strict-markers passes without `-p posttrain.testing.kit`
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def cpo_case_rows(n: int, seed: int) -> list[dict]:
    """The case-following task: prompt "U:" prefers the upper-case string, "L:" the lower-case one.

    Chosen and rejected hold the same letters, half the prompts want each case, so an untrained model
    sits near 0.5 preference accuracy and only conditioning on the prompt beats it.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        upper = i % 2 == 0
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 7)))
        chosen, rejected = (word.upper(), word) if upper else (word, word.upper())
        rows.append({"prompt": "U:" if upper else "L:", "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def cpo_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("cpo") / "model")


@pytest.fixture
def cpo_rows():
    return cpo_case_rows
