"""Fixtures for posttrain-sft's tests: a tiny Llama, its character tokenizer and a context to call the method."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


@pytest.fixture(autouse=True)
def _sft_single_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait 10-20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("sft-tiny") / "model")


@pytest.fixture(scope="session")
def sft_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def sft_ctx(sft_tokenizer):
    """``make(**config_fields)`` -> a TrainContext with an SFTConfig and the tiny tokenizer."""
    from posttrain import TrainContext
    from posttrain_sft import SFTConfig

    def make(**fields):
        return TrainContext(config=SFTConfig(**fields), tokenizer=sft_tokenizer)

    return make


@pytest.fixture(scope="session")
def logged():
    """``logged(*metric_dicts)`` -> what the loop logs for these micro-batches on one process, as floats.

    ``Metric.ratio``: sum of numerators / sum of denominators; ``Metric.total`` / ``Metric.sum``: the sum (a total
    starting from 0); a plain value: the mean.
    """
    import torch
    from posttrain import Metric

    def reduce(*metric_dicts: dict) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for metrics in metric_dicts:
            for name, value in metrics.items():
                if not isinstance(value, Metric):
                    value = Metric.mean(value)
                assert value.kind in ("mean", "ratio", "sum", "total"), f"{name}: unexpected kind {value.kind}"
                denominator = value.denominator if value.kind == "ratio" else float(value.kind == "mean")
                pair = sums.setdefault(name, [0.0, 0.0])
                pair[0] += float(torch.as_tensor(value.value, dtype=torch.float64))
                pair[1] += float(torch.as_tensor(denominator, dtype=torch.float64))
        return {name: num / den if den else num for name, (num, den) in sums.items()}

    return reduce
