"""Fixtures for posttrain-grpo's tests: test rewards registered through the pluggy hook, tiny models."""

from __future__ import annotations

import pytest
import torch
from posttrain import hookimpl


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def grpo_first_is_digit(prompts, completions, **columns):
    """1.0 when the completion starts with a digit: a dense signal a random tiny model can climb."""
    return [float(bool(c) and c[0].isdigit()) for c in completions]


def grpo_exact(prompts, completions, answer, **columns):
    """Verifier: the completion (stripped) equals the ``answer`` column."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


class _GRPOTestRewards:
    @hookimpl
    def posttrain_register_rewards(self, registry):
        registry.add("grpo_first_is_digit", grpo_first_is_digit)
        registry.add("grpo_exact", grpo_exact)


@pytest.fixture(autouse=True)
def grpo_test_env():
    """One torch thread (tiny matrices: threads only contend) and the test rewards on a fresh plugin manager."""
    from posttrain import _registry as registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset_plugin_manager()
    registry.plugin_manager().register(_GRPOTestRewards(), name="grpo-test-rewards")
    yield
    registry.reset_plugin_manager()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def grpo_tiny_model(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("grpo-tiny") / "model")


@pytest.fixture(scope="session")
def grpo_echo_model(tmp_path_factory):
    """A tiny model that answers ``echo D`` with one digit and EOS, right ~20-55% of the time."""
    from posttrain.testing import build_echo_model

    return build_echo_model(tmp_path_factory.mktemp("grpo-echo"), seed=0)


@pytest.fixture
def grpo_echo_rows() -> list[dict]:
    return [{"prompt": f"echo {i % 10}", "answer": str(i % 10)} for i in range(40)]
