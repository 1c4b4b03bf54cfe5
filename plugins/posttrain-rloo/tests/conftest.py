"""Fixtures for posttrain-rloo's tests: test rewards registered through the pluggy hook, tiny models."""

from __future__ import annotations

import random

import pytest
import torch
from posttrain import hookimpl


def pytest_configure(config):
    # The kit marks its checks; without `-p posttrain.testing.kit` the marker is unknown to --strict-markers.
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def rloo_first_is_digit(prompts, completions, **columns):
    """1.0 when the completion starts with a digit: a dense signal a random tiny model can climb."""
    return [float(bool(c) and c[0].isdigit()) for c in completions]


def rloo_exact(prompts, completions, answer, **columns):
    """Verifier: the completion (stripped) equals the ``answer`` column."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


class _RLOOTestRewards:
    @hookimpl
    def posttrain_register_rewards(self, registry):
        registry.add("rloo_first_is_digit", rloo_first_is_digit)
        registry.add("rloo_exact", rloo_exact)


@pytest.fixture(autouse=True)
def rloo_test_env():
    """One torch thread (tiny matrices: threads only contend) and the test rewards on a fresh plugin manager."""
    from posttrain import registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset_plugin_manager()
    registry.plugin_manager().register(_RLOOTestRewards(), name="rloo-test-rewards")
    yield
    registry.reset_plugin_manager()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rloo_tiny_model(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("rloo-tiny") / "model")


@pytest.fixture(scope="session")
def rloo_echo_model(tmp_path_factory):
    """A tiny model taught by a short cross-entropy loop to answer ``echo D`` with one digit and EOS.

    Half of its training targets are the prompt's digit and half a random digit, so it starts well
    below perfect on the echo verifier and RL has something to improve.
    """
    from posttrain.testing import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the per-test thread pinning
    path = build_tiny_model(tmp_path_factory.mktemp("rloo-echo") / "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rng = random.Random(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    for _ in range(150):
        rows = []
        for _ in range(16):
            d = rng.randrange(10)
            target = d if rng.random() < 0.5 else rng.randrange(10)
            rows.append([*tok(f"echo {d}").input_ids, digit_ids[target], tok.eos_token_id])
        x = torch.tensor(rows)
        labels = x[:, 1:].clone()
        labels[:, :-2] = -100  # learn the answer digit and EOS only
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = path.parent / "echo"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def rloo_echo_rows() -> list[dict]:
    return [{"prompt": f"echo {i % 10}", "answer": str(i % 10)} for i in range(40)]
