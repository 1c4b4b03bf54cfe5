"""TPO data: exact collator tensors, tokenization, implicit prompts, row-level errors, config checks."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain.config import load_config
from posttrain_tpo import TPO, TPOConfig
from posttrain_tpo.data import collate_rows, prepare_rows, split_prompt, tokenize_triple

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# character tokenizer ids: a=5, b=6, c=7, d=8, e=9; <pad>=0, <|end|>=1 (EOS), <|user|>=3, <|assistant|>=4
TOKENIZED = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "reference_ids": [7, 8]},
    {"prompt_ids": [9, 10], "chosen_ids": [11], "rejected_ids": [12, 13], "reference_ids": [14]},
]


def test_collator_exact_tensors():
    """[chosen rows; rejected rows; reference rows], each prompt+completion, right-padded with 0."""
    batch = collate_rows(TOKENIZED, pad_token_id=0)
    assert torch.equal(
        batch["input_ids"],
        torch.tensor(
            [
                [1, 2, 3, 4, 5],
                [9, 10, 11, 0, 0],
                [1, 2, 3, 6, 0],
                [9, 10, 12, 13, 0],
                [1, 2, 3, 7, 8],
                [9, 10, 14, 0, 0],
            ]
        ),
    )
    assert torch.equal(
        batch["attention_mask"],
        torch.tensor(
            [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
        ),
    )
    assert torch.equal(
        batch["completion_mask"],
        torch.tensor(
            [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
        ),
    )


def test_collator_truncation_and_no_reference():
    """max_length 3: keep_start keeps [1 2 3] of row 0 (no completion left), keep_end keeps [3 4 5]."""
    start = collate_rows(TOKENIZED, 0, max_length=3, include_reference=False)
    assert torch.equal(start["input_ids"], torch.tensor([[1, 2, 3], [9, 10, 11], [1, 2, 3], [9, 10, 12]]))
    assert torch.equal(start["completion_mask"], torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]]))
    end = collate_rows(TOKENIZED, 0, max_length=3, truncation_mode="keep_end", include_reference=False)
    assert torch.equal(end["input_ids"], torch.tensor([[3, 4, 5], [9, 10, 11], [2, 3, 6], [10, 12, 13]]))
    assert torch.equal(end["completion_mask"], torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]))


def test_standard_rows_get_eos(tpo_tokenizer):
    row = {"prompt": "ab", "chosen": "c", "rejected": "dd", "reference": "e<|end|>"}
    assert tokenize_triple(tpo_tokenizer, row) == {
        "prompt_ids": [5, 6],
        "chosen_ids": [7, 1],
        "rejected_ids": [8, 8, 1],
        "reference_ids": [9, 1],
    }


def test_conversational_rows_use_the_chat_template(tpo_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
        "reference": [{"role": "assistant", "content": "d"}],
    }
    assert tokenize_triple(tpo_tokenizer, row) == {
        "prompt_ids": [3, 5, 1, 4],
        "chosen_ids": [6, 1],
        "rejected_ids": [7, 1],
        "reference_ids": [8, 1],
    }


def test_implicit_prompt_is_stripped_from_reference():
    row = {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no", "reference": "Q: hi A: ok"}
    assert split_prompt(row, 0) == {"prompt": "Q: hi A:", "chosen": " yes", "rejected": " no", "reference": " ok"}
    with pytest.raises(DataError, match=r"row 4 .*'reference' does not start with the prompt"):
        split_prompt({**row, "reference": "ok"}, 4)


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r", "reference": "g"}


@pytest.mark.parametrize(
    ("bad", "row", "field", "what"),
    [
        ({"reference": None}, 2, "reference", "is missing"),
        ({"reference": ""}, 1, "reference", "is empty"),
        ({"reference": 7}, 1, "reference", "must be a string or a list of messages"),
        (
            {"reference": [{"role": "assistant", "content": "g"}]},
            2,
            "reference",
            "is a list of messages but 'chosen' is a string",
        ),
        ({"rejected": None}, 1, "rejected", "is missing"),
    ],
)
def test_bad_rows_are_named(tpo_tokenizer, bad, row, field, what):
    rows = [dict(GOOD) for _ in range(3)]
    rows[row].update(bad)
    with pytest.raises(DataError, match=rf"row {row} of the dataset: field '{field}' {what}.*check-data tpo"):
        prepare_rows(rows, tpo_tokenizer)


def test_missing_reference_column_and_check_rows(tpo_tokenizer):
    """A dataset without the column fails at row 0; check_rows lists every bad row, in row order."""
    no_column = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"row 0 .*'reference' is missing: the dataset has columns"):
        prepare_rows(no_column, tpo_tokenizer)
    rows = [dict(GOOD), {**GOOD, "reference": None}, {**GOOD, "chosen": None}, {**GOOD, "reference": ""}]
    problems = TPO().check_rows(rows)
    assert [(p.row, p.field, p.problem) for p in problems] == [
        (1, "reference", "is missing"),
        (2, "chosen", "is missing"),
        (3, "reference", "is empty"),
    ]


def test_prepare_refuses_exactly_the_rows_check_rows_reports(tpo_tokenizer):
    """check-data (no model, no tokenizer) and training agree: every bad row, implicit-prompt references too."""
    implicit = {"chosen": "Q: yes", "rejected": "Q: no", "reference": "Q: ok"}
    rows = [
        dict(GOOD),
        {**GOOD, "reference": None},
        {**implicit, "reference": "ok"},  # does not start with the shared prompt "Q:"
        {**GOOD, "rejected": None, "reference": ""},  # two problems in one row
        implicit,
    ]
    reported = TPO().check_rows(rows)
    assert [(p.row, p.field) for p in reported] == [
        (1, "reference"),
        (2, "reference"),
        (3, "rejected"),
        (3, "reference"),
    ]
    assert all(isinstance(p, RowProblem) for p in reported)
    with pytest.raises(DataError) as info:
        prepare_rows(rows, tpo_tokenizer)
    assert info.value.problems == reported and info.value.method == "tpo"
    assert "(3 more problems in other rows.)" in str(info.value)
    good = [rows[0], rows[4]]
    assert TPO().check_rows(good) == [] and len(prepare_rows(good, tpo_tokenizer)) == 2


def test_config_checks():
    with pytest.raises(ConfigError) as info:
        load_config(TPOConfig, None, {"loss_type": "hinge", "label_smoothing": "0.1", "beta": "0", "tpo_alpha": "-1"})
    assert len(info.value.problems) == 3 and "applies to 'sigmoid' and 'tpo-l' only" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'tpo-l'"):
        load_config(TPOConfig, None, {"loss_type": "tpo_l"})


def test_shipped_yaml_loads():
    config = load_config(TPOConfig, CONFIGS / "tiny.yaml", {"model": "m", "dataset": "d"})
    assert (config.loss_type, config.beta, config.tpo_alpha, config.max_length) == ("sigmoid", 0.01, 1.0, 64)
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train tpo --config plugins/posttrain-tpo/configs/tiny.yaml")
