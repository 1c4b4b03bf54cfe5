"""ORPO data: exact token ids and collator tensors, truncation, and row-level errors naming row and field.

The tiny character tokenizer maps <pad>=0, <|end|>=1 (EOS), <|user|>=3, <|assistant|>=4, 'a'=5, 'b'=6, ...
and has no BOS token.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import DataError
from posttrain.testing import build_tokenizer
from posttrain_orpo import ORPO
from posttrain_orpo.data import collate_pairs, prepare_rows, truncate_row


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _prepare(rows, tok, max_length=64, max_prompt_length=None):
    return prepare_rows(datasets.Dataset.from_list(rows), tok, max_length, max_prompt_length)


def test_standard_rows_get_eos_and_exact_collator_tensors(tok):
    rows = _prepare(
        [{"prompt": "ab", "chosen": "c", "rejected": "de"}, {"prompt": "a", "chosen": "bc", "rejected": "d"}], tok
    )
    assert rows[0] == {"prompt_ids": [5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 9, 1]}
    batch = collate_pairs(rows, pad_token_id=0)
    assert torch.equal(
        batch["input_ids"],
        torch.tensor(
            [
                [5, 6, 7, 1, 0],  # chosen 1
                [5, 6, 7, 1, 0],  # chosen 2: "a" + "bc" + EOS
                [5, 6, 8, 9, 1],  # rejected 1
                [5, 8, 1, 0, 0],  # rejected 2
            ]
        ),
    )
    assert torch.equal(
        batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    )
    assert torch.equal(
        batch["completion_mask"], torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    )


def test_conversational_row_uses_chat_template_without_double_eos(tok):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yo"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    (prepared,) = _prepare([row], tok)
    assert prepared["prompt_ids"] == tok("<|user|>hi<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    assert prepared["chosen_ids"] == tok("yo", add_special_tokens=False)["input_ids"] + [1]
    assert prepared["rejected_ids"] == tok("no", add_special_tokens=False)["input_ids"] + [1]


def test_implicit_prompts_standard_and_conversational(tok):
    standard = {"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}
    user = {"role": "user", "content": "hi"}
    conversational = {
        "chosen": [user, {"role": "assistant", "content": "yo"}],
        "rejected": [user, {"role": "assistant", "content": "no"}],
    }
    first, second = _prepare([standard], tok)[0], _prepare([conversational], tok)[0]
    assert first["prompt_ids"] == tok("Q: x A:", add_special_tokens=False)["input_ids"]
    assert first["chosen_ids"] == tok(" yes", add_special_tokens=False)["input_ids"] + [1]
    assert second["prompt_ids"] == tok("<|user|>hi<|end|><|assistant|>", add_special_tokens=False)["input_ids"]


def test_truncation_keeps_prompt_end_then_cuts_completions():
    ids = {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8]}
    assert truncate_row(ids, max_length=5, max_prompt_length=None) == {
        "prompt_ids": [1, 2, 3, 4],
        "chosen_ids": [5],
        "rejected_ids": [8],
    }
    assert truncate_row(ids, max_length=5, max_prompt_length=2) == {
        "prompt_ids": [3, 4],
        "chosen_ids": [5, 6, 7],
        "rejected_ids": [8],
    }
    assert truncate_row(ids, max_length=4, max_prompt_length=None) is None


def test_rows_whose_prompt_fills_max_length_are_dropped_with_one_warning(tok):
    rows = [{"prompt": "abcdef", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x", "rejected": "y"}]
    with pytest.warns(UserWarning, match=r"dropped 1 row.*max_length=4 \(first: row 0\)"):
        kept = _prepare(rows, tok, max_length=4)
    assert kept == [{"prompt_ids": [5], "chosen_ids": [28, 1], "rejected_ids": [29, 1]}]


@pytest.mark.parametrize(("drop", "index"), [("rejected", 2), ("chosen", 1)])
def test_missing_field_names_row_and_field(tok, drop, index):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"} for _ in range(4)]
    rows[index] = {k: v for k, v in rows[index].items() if k != drop}
    # from_list fills a key missing in one row with None; validation treats None as missing
    with pytest.raises(DataError, match=rf"row {index} .*'{drop}' is missing"):
        _prepare(rows, tok)


def test_missing_column_names_the_column(tok):
    with pytest.raises(DataError, match="rejected"):
        _prepare([{"prompt": "a", "chosen": "b"}], tok)


def test_mixed_string_and_messages_names_row_and_field(tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    ]
    rows[1]["prompt"] = "q"  # arrow cannot hold a column of mixed types, so pass the rows as a plain list
    with pytest.raises(DataError, match=r"row 1 .*'prompt'"):
        prepare_rows(rows, tok, 64, None)


def test_prompt_ending_with_system_message_is_refused(tok):
    row = {
        "prompt": [{"role": "system", "content": "be nice"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(DataError, match=r"row 0 .*'prompt' ends with a 'system' message"):
        _prepare([row], tok)


def test_empty_prompt_without_bos_is_refused(tok):
    with pytest.raises(DataError, match=r"row 0 .*'prompt' gives no tokens"):
        _prepare([{"prompt": "", "chosen": "a", "rejected": "b"}], tok)


def test_prepare_refuses_exactly_the_rows_check_rows_reports(tok):
    """check-data (no model, no tokenizer) and training agree: every bad row, in one DataError."""
    user, system = {"role": "user", "content": "q"}, {"role": "system", "content": "be nice"}
    answer = [{"role": "assistant", "content": "a"}]
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": [system], "chosen": answer, "rejected": answer},
        {"prompt": "a", "chosen": "b", "rejected": None},
        {"prompt": [user], "chosen": "b", "rejected": "c"},
        {"chosen": [user, *answer], "rejected": [{"role": "user", "content": "other"}, *answer]},
    ]
    reported = ORPO().check_rows(rows)
    assert [(p.row, p.field) for p in reported] == [(1, "prompt"), (2, "rejected"), (3, "prompt"), (4, "prompt")]
    assert [p.problem.split(" ")[0] for p in reported] == ["ends", "is", "is", "is"]
    with pytest.raises(DataError) as info:
        prepare_rows(rows, tok, 64, None)
    assert info.value.problems == reported and info.value.method == "orpo"
    assert "(3 more problems in other rows.)" in str(info.value) and "posttrain check-data orpo" in str(info.value)
    assert ORPO().check_rows(rows[:1]) == [] and len(prepare_rows(rows[:1], tok, 64, None)) == 1


def test_every_prompt_without_tokens_is_named_at_once(tok):
    """Only the tokenizer tells that a prompt gives no token (no BOS): prepare still reports every such row."""
    rows = [{"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "x", "chosen": "a", "rejected": "b"}] * 2
    assert ORPO().check_rows(rows) == []
    with pytest.raises(DataError) as info:
        _prepare(rows, tok)
    assert [(p.row, p.field) for p in info.value.problems] == [(0, "prompt"), (2, "prompt")]
