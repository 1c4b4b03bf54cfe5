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
