"""Fixtures for posttrain-dpo's tests: a tiny Llama, its character tokenizer, contexts and synthetic pairs."""

from __future__ import annotations

import random

import pytest


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def _keyword_pairs(n: int, seed: int) -> list[dict]:
    """Synthetic preferences: the chosen answer repeats the prompt's word and says 'please'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"Repeat {word}:", "chosen": f" {word} please", "rejected": f" {word[::-1]} no"})
    return rows


@pytest.fixture(scope="session")
def dpo_pairs():
    """``make(n, seed)`` -> n standard preference rows (see ``_keyword_pairs``)."""
    return _keyword_pairs


@pytest.fixture(scope="session")
def dpo_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dpo-tiny") / "model")


@pytest.fixture(scope="session")
def dpo_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def dpo_ctx(dpo_tokenizer, dpo_model_dir):
    """``make(model=None, **config_fields)`` -> a TrainContext with a DPOConfig, the tokenizer and a model."""
    from posttrain import TrainContext
    from posttrain_dpo import DPOConfig

    def make(model=None, **fields):
        config = DPOConfig(model=str(dpo_model_dir), **fields)
        return TrainContext(config=config, tokenizer=dpo_tokenizer, model=model, model_path=str(dpo_model_dir))

    return make
