"""Dataset loading and validation: formats, row-level errors, implicit prompts."""

from __future__ import annotations

import json

import pytest
from posttrain import data
from posttrain._errors import DataError

ROWS = [{"prompt": "2+2=", "completion": "four"}, {"prompt": "1+1=", "completion": "two"}]


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_load_each_file_format(tmp_path, suffix):
    import datasets

    path = tmp_path / f"d.{suffix}"
    ds = datasets.Dataset.from_list(ROWS)
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == "json":
        ds.to_json(str(path))
    elif suffix == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_parquet(str(path))
    loaded = data.load_dataset(str(path))
    assert loaded.to_list() == ROWS


def test_load_saved_directory_and_objects(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert data.load_dataset(str(tmp_path / "saved")).to_list() == ROWS
    assert data.load_dataset(ds) is ds
    assert data.load_dataset(ROWS).to_list() == ROWS
    dd = datasets.DatasetDict({"train": ds})
    assert data.load_dataset(dd, "train") is ds
    with pytest.raises(DataError, match="no split 'test'"):
        data.load_dataset(dd, "test")


def test_missing_empty_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.load_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="row 0 of .*bad.jsonl: line 1 is not valid JSON"):
        data.load_dataset(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format"):
        data.load_dataset(str(tmp_path / "x.txt"))


def test_detect_format():
    assert data.detect_format(["text"]) == "language_modeling"
    assert data.detect_format(["prompt"]) == "prompt_only"
    assert data.detect_format(["prompt", "completion"]) == "prompt_completion"
    assert data.detect_format(["chosen", "rejected"]) == "preference"
    assert data.detect_format(["prompt", "completion", "label"]) == "unpaired_preference"
    assert data.detect_format(["foo"]) is None


def test_validate_names_row_and_field():
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3 + [{"prompt": "a", "chosen": "b", "rejected": None}]
    problems = data.validate(rows_ds(rows), "preference", "pairs.jsonl")
    assert len(problems) == 1
    message = problems[0].message("pairs.jsonl")
    assert message.startswith("row 3 of pairs.jsonl: field 'rejected' is missing")
    assert "prompt+chosen+rejected" in message


def test_validate_wrong_format_says_what_it_looks_like():
    problems = data.validate(rows_ds(ROWS), ("preference",), "sft.jsonl")
    assert "looks like prompt_completion" in problems[0].message()


def test_validate_message_problems():
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": []},
    ]
    problems = data.validate(rows_ds(rows), "language_modeling")
    assert "unknown role 'wizard'" in problems[0].problem and problems[0].row == 0
    assert "non-string content" in problems[1].problem and problems[1].row == 1
    assert "non-empty list" in problems[2].problem


def test_empty_completion_and_non_string():
    rows = [{"prompt": "a", "completion": ""}, {"prompt": "a", "completion": 5}]
    problems = data.validate(rows_ds(rows), "prompt_completion")
    assert problems[0].field == "completion" and "empty" in problems[0].problem
    assert problems[1].row == 1 and "must be a string" in problems[1].problem


def test_label_must_be_bool():
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "b", "label": "yes"}]
    problems = data.validate(rows_ds(rows), "unpaired_preference")
    assert [p.row for p in problems] == [1] and problems[0].field == "label"


def test_check_raises_with_pointer_to_check_data():
    with pytest.raises(DataError, match="row 1 of train.jsonl.*posttrain check-data"):
        data.check(rows_ds([{"text": "x"}, {"text": ""}]), "language_modeling", "train.jsonl")


def test_extract_prompt_standard_and_conversational():
    row = data.extract_prompt({"chosen": "The sky is blue", "rejected": "The sky is green"})
    assert row == {"prompt": "The sky is", "chosen": " blue", "rejected": " green"}
    conv = data.extract_prompt(
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        }
    )
    assert conv["prompt"] == [{"role": "user", "content": "q"}]
    assert conv["chosen"] == [{"role": "assistant", "content": "good"}]
    explicit = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert data.extract_prompt(explicit) is explicit


def test_chat_template_required():
    class NoTemplate:
        chat_template = None

    with pytest.raises(DataError, match="no chat template"):
        data.apply_chat_template(NoTemplate(), [{"role": "user", "content": "x"}])


def rows_ds(rows):
    """Plain lists validate too (Arrow would refuse the mixed types these tests need)."""
    return rows
