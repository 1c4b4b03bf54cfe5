"""Prompt-only data preparation and the exact collated tensors."""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import DataError
from posttrain.testing import build_tokenizer
from posttrain_grpo.data import collate, prepare


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_prepare_keeps_extra_columns_and_row_index(tok):
    rows = prepare(
        datasets.Dataset.from_list([{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]), tok
    )
    # character tokenizer: <pad>=0, <|end|>=1, <|system|>=2, <|user|>=3, <|assistant|>=4, 'a'=5, 'b'=6, ...
    assert rows[0] == {"prompt_ids": [5, 6], "prompt": "ab", "columns": {"answer": "1"}, "index": 0}
    assert rows[1]["prompt_ids"] == [5, 6, 7, 8] and rows[1]["index"] == 1


def test_collate_left_pads_prompts_exactly(tok):
    rows = prepare(
        datasets.Dataset.from_list([{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]), tok
    )
    batch = collate(rows, tok.pad_token_id)
    assert torch.equal(batch["prompt_ids"], torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert batch["prompts"] == ["ab", "abcd"]
    assert batch["columns"] == {"answer": ["1", "2"]}
    assert batch["row_index"] == [0, 1]


def test_conversational_prompt_gets_the_generation_prompt(tok):
    rows = prepare(datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}]), tok)
    h, i = tok.convert_tokens_to_ids(["h", "i"])
    # <|user|> h i <|end|> <|assistant|>
    assert rows[0]["prompt_ids"] == [3, h, i, 1, 4]
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"question": "no prompt"}, "prompt", "missing"),
        ({"prompt": "   "}, "prompt", "empty"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "prompt", "unknown role"),
    ],
)
def test_bad_row_is_named(tok, row, field, words):
    good = {"prompt": "fine", "question": "q"} if "question" in row else {"prompt": "fine"}
    if isinstance(row.get("prompt"), list):
        good = {"prompt": [{"role": "user", "content": "fine"}]}
    dataset = datasets.Dataset.from_list([good, good, row])
    with pytest.raises(DataError) as info:
        prepare(dataset, tok)
    assert "row 2" in str(info.value) and repr(field) in str(info.value) and words in str(info.value)
