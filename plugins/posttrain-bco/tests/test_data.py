"""BCO data: tokenization, unpairing, truncation, exact collator tensors, row-level errors, config checks."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain.config import load_config
from posttrain_bco import BCO, BCOConfig
from posttrain_bco.data import collate_rows, prepare_rows, tokenize_row, unpair

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# character tokenizer ids: a=5, b=6, c=7, d=8; <pad>=0, <|end|>=1 (EOS), <|user|>=3, <|assistant|>=4


def test_collator_exact_tensors(bco_tokenizer):
    """("ab", "c", T) -> [a b | c EOS]; ("a", "bcd", F) -> [a | b c d EOS]; right-padded with <pad>=0."""
    rows = prepare_rows(
        datasets.Dataset.from_list(
            [
                {"prompt": "ab", "completion": "c", "label": True},
                {"prompt": "a", "completion": "bcd", "label": False},
            ]
        ),
        bco_tokenizer,
        max_length=64,
    )
    assert rows[0] == {"prompt_ids": [5, 6], "completion_ids": [7, 1], "label": True}
    batch = collate_rows(rows, bco_tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 1, 0], [5, 6, 7, 8, 1]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(batch["completion_mask"], torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([True, False]))


def test_conversational_rows_use_the_chat_template(bco_tokenizer):
    """<|user|> a <|end|> <|assistant|> is the prompt; b <|end|> the completion (no second EOS)."""
    prompt, completion = tokenize_row(
        bco_tokenizer, [{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]
    )
    assert prompt == [3, 5, 1, 4] and completion == [6, 1]


def test_paired_rows_are_unpaired_with_implicit_prompt():
    rows = unpair(
        [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, {"prompt": "P", "chosen": "c", "rejected": "r"}]
    )
    assert rows == [
        {"prompt": "Q: hi A:", "completion": " yes", "label": True},
        {"prompt": "Q: hi A:", "completion": " no", "label": False},
        {"prompt": "P", "completion": "c", "label": True},
        {"prompt": "P", "completion": "r", "label": False},
    ]


def test_truncation_cuts_the_completion_and_drops_rows_without_room(bco_tokenizer):
    """max_length 4: "ab"+"cdef" keeps [c d]; a 4-token prompt leaves nothing to score and is dropped."""
    data = datasets.Dataset.from_list(
        [{"prompt": "ab", "completion": "cdef", "label": True}, {"prompt": "abcd", "completion": "e", "label": False}]
    )
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        rows = prepare_rows(data, bco_tokenizer, max_length=4)
    assert rows == [{"prompt_ids": [5, 6], "completion_ids": [7, 8], "label": True}]


@pytest.mark.parametrize(
    ("rows", "row", "field"),
    [
        (
            [{"prompt": "a", "completion": "b", "label": True}] * 2
            + [{"prompt": "a", "completion": "b", "label": None}],
            2,
            "label",
        ),
        (
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": None, "label": True}],
            1,
            "completion",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": None}],
            1,
            "rejected",
        ),
        (
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "b", "label": "yes"}],
            1,
            "label",
        ),
    ],
)
def test_bad_rows_are_named(bco_tokenizer, rows, row, field):
    """Rows as a plain list (a `datasets.Dataset` cannot even hold a string in a bool column)."""
    with pytest.raises(DataError, match=rf"row {row} .*'{field}'"):
        prepare_rows(rows, bco_tokenizer, max_length=64)


def test_prepare_refuses_exactly_the_rows_check_rows_reports(bco_tokenizer):
    """check-data (no model, no tokenizer) and training agree: every bad row, core's problems and BCO's own."""
    messages = [{"role": "user", "content": "a"}]
    good = {"prompt": "a", "completion": "b", "label": True}
    rows = [
        good,
        {"prompt": messages, "completion": "b", "label": False},
        {"prompt": "a", "completion": "b", "label": "yes"},
        {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True},
    ]
    reported = BCO().check_rows(rows)
    assert [(p.row, p.field) for p in reported] == [(1, "completion"), (2, "label"), (3, "completion")]
    assert all(isinstance(p, RowProblem) for p in reported)
    with pytest.raises(DataError) as info:
        prepare_rows(rows, bco_tokenizer, max_length=64)
    assert info.value.problems == reported and info.value.method == "bco"
    assert "(2 more problems in other rows.)" in str(info.value) and "posttrain check-data bco" in str(info.value)
    assert BCO().check_rows([good, good]) == [] and len(prepare_rows([good, good], bco_tokenizer, max_length=64)) == 2


def test_wrong_format_names_the_missing_columns(bco_tokenizer):
    with pytest.raises(DataError, match="completion"):
        prepare_rows(datasets.Dataset.from_list([{"prompt": "a", "text": "b"}]), bco_tokenizer, max_length=64)


def test_config_rejects_udm_and_bad_values():
    with pytest.raises(ConfigError, match="udm is true, but posttrain-bco does not implement") as info:
        load_config(BCOConfig, None, {"udm": "true", "beta": "0", "max_length": "1"})
    assert len(info.value.problems) == 3  # every problem reported at once


def test_shipped_yaml_loads():
    config = load_config(BCOConfig, CONFIGS / "tiny.yaml", {"model": "m", "dataset": "d"})
    assert (config.beta, config.max_length, config.max_steps) == (0.1, 64, 20)
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train bco --config plugins/posttrain-bco/configs/tiny.yaml")
