"""Fixtures for posttrain-rewards' tests: a clean plugin manager and environment, a tiny reward model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def rewards_test_env(monkeypatch):
    from posttrain import _registry as registry

    for var in (
        "POSTTRAIN_FORMAT_PATTERN",
        "POSTTRAIN_LENGTH_PENALTY",
        "POSTTRAIN_REWARD_MODEL",
        "POSTTRAIN_PLUGINS",
        "POSTTRAIN_DISABLE_PLUGINS",
    ):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset_plugin_manager()
    yield
    registry.reset_plugin_manager()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rewards_tiny_rm(tmp_path_factory):
    """A random one-label LlamaForSequenceClassification + the character tokenizer, saved locally."""
    from posttrain.testing import build_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rewards-rm") / "rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def rewards_fake_site(tmp_path, monkeypatch):
    """A directory on sys.path to write a fake third-party distribution (dist-info + module) into."""
    import importlib
    import sys

    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    importlib.invalidate_caches()
    for name in [n for n, m in sys.modules.items() if str(root) in str(getattr(m, "__file__", ""))]:
        del sys.modules[name]
