"""Fixtures for posttrain-online-dpo's tests: a test reward and a test judge registered through the pluggy hook,
tiny models."""

from __future__ import annotations

import pytest
import torch
from posttrain import hookimpl
from posttrain.rewards import judge


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def odpo_first_is_digit(prompts, completions, **columns):
    """1.0 when the completion starts with a digit: a dense signal a random tiny model can climb."""
    return [float(bool(c) and c[0].isdigit()) for c in completions]


def odpo_short(prompts, completions, completion_ids, **columns):
    """Minus the completion's length in tokens: dense (pairs rarely tie), and a tiny model learns EOS quickly."""
    return [-float(len(ids)) for ids in completion_ids]


@judge
def odpo_prefers_digits(prompts, completions, **columns):
    """Test judge: the completion with more digits wins; no preference on a tie."""
    out = []
    for first, second in completions:
        a, b = sum(ch.isdigit() for ch in first), sum(ch.isdigit() for ch in second)
        out.append(None if a == b else 0 if a > b else 1)
    return out


class _OnlineDPOTestPlugin:
    @hookimpl
    def posttrain_register_rewards(self, registry):
        registry.add("odpo_first_is_digit", odpo_first_is_digit)
        registry.add("odpo_short", odpo_short)
        registry.add("odpo_prefers_digits", odpo_prefers_digits)


@pytest.fixture(autouse=True)
def odpo_test_env():
    """One torch thread (tiny matrices: threads only contend) and the test plugin on a fresh plugin manager."""
    from posttrain import _registry as registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset_plugin_manager()
    registry.plugin_manager().register(_OnlineDPOTestPlugin(), name="online-dpo-test-plugin")
    yield
    registry.reset_plugin_manager()
    torch.set_num_threads(threads)


class FixedGenerator:
    """A generation backend that returns the same completions every call: ``pairs[i]`` are prompt i's two samples
    (token lists; a list without EOS counts as truncated). Tests install it as ``method.generator``."""

    name, reports_logps = "fixed", False

    def __init__(self, pairs, eos_token_id=1):
        self.pairs, self.eos = pairs, eos_token_id

    def generate(self, prompt_ids, n, seeds=None):
        from posttrain.generation import Completions

        assert n == 2 and len(prompt_ids) == len(self.pairs), (n, len(prompt_ids))
        ids = [list(c) for pair in self.pairs for c in pair]
        return Completions(token_ids=ids, truncated=[self.eos not in c for c in ids])

    def sync_weights(self, model):
        pass

    def close(self):
        pass


@pytest.fixture
def odpo_fixed_generator():
    return FixedGenerator


@pytest.fixture(scope="session")
def odpo_tiny_model(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("odpo-tiny") / "model")


@pytest.fixture(scope="session")
def odpo_echo_model(tmp_path_factory):
    """A tiny model that answers ``echo D`` with one digit and EOS, right ~20-55% of the time."""
    from posttrain.testing import build_echo_model

    return build_echo_model(tmp_path_factory.mktemp("odpo-echo"), seed=0)
