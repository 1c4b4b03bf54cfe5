"""Fixtures for the posttrain-kto tests (names prefixed kto_ so they never clash with other plugins')."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _kto_one_thread():
    """Tiny models run fastest on one thread; it also keeps a busy 2-core machine from oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kto_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("kto") / "model")


@pytest.fixture(scope="session")
def kto_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()


def make_kto_rows(n: int = 16) -> list[dict]:
    """Unpaired rows: 'yes' answers are desirable, 'no' answers undesirable (balanced)."""
    rows = []
    for i in range(n):
        word = "abcdefgh"[i % 8] * (1 + i % 3)
        good = i % 2 == 0
        rows.append({"prompt": f"Say {word}:", "completion": f" {word} yes" if good else f" {word} no", "label": good})
    return rows


@pytest.fixture
def kto_rows():
    return make_kto_rows()
