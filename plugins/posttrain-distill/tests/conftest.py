"""Fixtures for the posttrain-distill tests (names prefixed distill_ so they never clash with other plugins')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PATTERN_PROMPTS = [
    f"{w}:" for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe"]
]
PATTERN = "abcabc"


@pytest.fixture(autouse=True)
def _distill_one_thread():
    """Tiny models run fastest on one thread; it also keeps a busy 2-core machine from oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def distill_student_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("distill") / "student", seed=0)


@pytest.fixture(scope="session")
def distill_teacher_dir(tmp_path_factory):
    """A random teacher, wider than the student (only the vocabulary must match)."""
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("distill") / "teacher", hidden_size=48, seed=1)


def build_pattern_teacher(path) -> Path:
    """A tiny teacher trained to answer every pattern prompt with 'abcabc' + EOS (40 full-batch Adam steps, seed 1)."""
    from posttrain.testing import build_tiny_model, build_tokenizer
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_model(path, seed=1)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tokenizer(p + PATTERN + tokenizer.eos_token).input_ids for p in PATTERN_PROMPTS])  # (16, 10)
    labels = ids.clone()
    labels[:, : len(tokenizer(PATTERN_PROMPTS[0]).input_ids)] = -100  # learn the completion only
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2, f"the pattern teacher did not learn its pattern (loss {loss.item():.3f})"
    model.save_pretrained(path)
    torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="session")
def distill_pattern_teacher_dir(tmp_path_factory):
    """See build_pattern_teacher."""
    return build_pattern_teacher(tmp_path_factory.mktemp("distill") / "pattern-teacher")
