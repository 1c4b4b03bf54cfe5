"""Fixtures for posttrain-envs' tests: one torch thread, a fresh plugin manager, a tiny model with the tool
tokenizer."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


@pytest.fixture(autouse=True)
def envs_test_setup(monkeypatch):
    """One torch thread (tiny matrices: threads only contend), no experimental warnings, a fresh plugin manager."""
    from posttrain import _registry as registry

    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset_plugin_manager()
    yield
    registry.reset_plugin_manager()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory):
    """A tiny random Llama with the character tokenizer, tool tokens and the tools-aware chat template."""
    from posttrain.testing import build_tiny_model
    from posttrain.testing.environments import build_tool_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("envs") / "model", tokenizer=build_tool_tokenizer())
