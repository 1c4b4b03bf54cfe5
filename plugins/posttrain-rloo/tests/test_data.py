"""Prompt-only data preparation and the exact collated tensors."""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import DataError
from posttrain.testing import build_tokenizer
from posttrain_rloo.data import collate, prepare


def test_collate_left_pads_prompts_and_carries_columns():
    tok = build_tokenizer()
    rows = prepare(
        datasets.Dataset.from_list([{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]), tok
    )
    batch = collate(rows, tok.pad_token_id)
    # character tokenizer: <pad>=0, 'a'=5, 'b'=6, 'c'=7, 'd'=8
    assert torch.equal(batch["prompt_ids"], torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert batch["columns"] == {"answer": ["1", "2"]} and batch["row_index"] == [0, 1]


def test_row_without_prompt_is_named():
    dataset = datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}])
    with pytest.raises(DataError, match=r"row 1 of the dataset: field 'prompt' is missing"):
        prepare(dataset, build_tokenizer())
