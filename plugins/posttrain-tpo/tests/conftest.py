"""Fixtures shared by the posttrain-tpo tests (names prefixed to avoid clashes across plugins)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tpo_model_dir(tmp_path_factory):
    """A tiny random Llama with the character tokenizer, built once per session."""
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tpo") / "tiny")


@pytest.fixture()
def tpo_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tpo_ctx(tpo_model_dir):
    """A TrainContext around a freshly loaded tiny policy, as the loop would build it (no accelerator)."""
    from posttrain import TrainContext
    from posttrain.config import build_config
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain_tpo import TPOConfig

    config = build_config(TPOConfig, {"model": str(tpo_model_dir), "max_length": 64})
    model = load_causal_lm(str(tpo_model_dir), config)
    return TrainContext(
        config=config, tokenizer=load_tokenizer(str(tpo_model_dir)), model=model, model_path=str(tpo_model_dir)
    )
