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


@pytest.fixture(scope="session")
def logged():
    """``logged(*metric_dicts)`` -> what the loop logs for these micro-batches on one process, as floats.

    A ``Metric.ratio`` is the sum of its numerators over the sum of its denominators; a plain value is the mean.
    """
    import torch
    from posttrain import Metric

    def reduce(*metric_dicts: dict) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for metrics in metric_dicts:
            for name, value in metrics.items():
                if isinstance(value, Metric):
                    assert value.kind == "ratio", f"{name}: unexpected kind {value.kind}"
                    numerator, denominator = value.value, value.denominator
                else:
                    numerator, denominator = value, 1.0
                pair = sums.setdefault(name, [0.0, 0.0])
                pair[0] += float(torch.as_tensor(numerator, dtype=torch.float64))
                pair[1] += float(torch.as_tensor(denominator, dtype=torch.float64))
        return {name: numerator / denominator for name, (numerator, denominator) in sums.items()}

    return reduce
