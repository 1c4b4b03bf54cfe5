"""Bad input, class "data": dataset files and rows.

``train`` and ``check-data`` read every file through one reader (``posttrain._reader``), so the last test
here feeds the same odd files to both and checks that they agree on each: same verdict, same rows named.
Rows count from 0 in file order.
"""

from __future__ import annotations

import codecs
import json

import pytest
from bad_input_catalogue import (
    CHAT,
    DROP,
    LM,
    PAIRS,
    PROMPT_COMPLETION,
    PROMPTS,
    UNPAIRED,
    Case,
    cli,
    edit,
    jsonl,
    run_case,
    train,
    write_files,
)

NOT_UTF8_ROW_3 = (jsonl(LM[:3]) + '{"text": "caf\xe9"}\n').encode("latin-1") + jsonl(LM[4:]).encode()
UTF16 = codecs.BOM_UTF16_LE + jsonl(LM).encode("utf-16-le")
BOM_UTF8 = codecs.BOM_UTF8 + jsonl(LM).encode()
TWO_BAD_LINES = jsonl(LM[:2]) + '{"text": "a",}\n' + jsonl(LM[2:5]) + "not json\n" + jsonl(LM[5:])
PRETTY = json.dumps({"text": "one row"}, indent=2) + "\n" + json.dumps({"text": "another"}, indent=2) + "\n"
MIXED_ANSWER = edit(PROMPTS, 5, answer=6)  # "14"-style strings and one number in the same column
CSV_PROMPTS = "prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in PROMPTS)
SAME_PAIR = edit(edit(PAIRS, 2, rejected=" yes"), 6, rejected=" yes")

CASES = [
    # -- files as a whole
    Case("dataset-missing", train("sft", "--dataset", "{tmp}/missing.jsonl"), 2,
         ["'{tmp}/missing.jsonl'", "does not exist"], ["Check the path"]),
    Case("dataset-empty", train("sft", "--dataset", "{tmp}/empty.jsonl"), 2,
         ["empty.jsonl", "is empty"], ["needs at least one row"], {"empty.jsonl": ""}),
    Case("dataset-only-blank-lines", train("sft", "--dataset", "{tmp}/blank.jsonl"), 2,
         ["blank.jsonl", "is empty"], ["needs at least one row"], {"blank.jsonl": "\n\n  \n"}),
    Case("dataset-path-typo-without-extension", train("sft", "--dataset", "{tmp}/data/trian"), 2,
         ["dataset path '{tmp}/data/trian' does not exist"], ["Check the path", "needs its extension"],
         {"data/train.jsonl": LM}),
    Case("dataset-unknown-suffix", train("sft", "--dataset", "{tmp}/data.txt"), 2,
         ["data.txt", "cannot tell the format"], ["use .json, .jsonl, .csv or .parquet"], {"data.txt": "hello"}),
    Case("dataset-directory-not-saved", train("sft", "--dataset", "{tmp}/folder"), 2,
         ["folder is a directory"], ["save_to_disk"], {"folder/notes.md": "not a dataset"}),
    Case("dataset-too-small-for-one-step", train("sft", "--dataset", "{tmp}/lm.jsonl",
         "--per_device_train_batch_size", "16"), 2,
         ["8 rows", "one optimizer step needs 16"], ["lower them or add data"], {"lm.jsonl": LM}),
    Case("dataset-utf16-without-bom", train("sft", "--dataset", "{tmp}/u16.jsonl"), 2,
         ["u16.jsonl", "NUL bytes", "UTF-16 or UTF-32 without a byte-order mark"], ["save it as UTF-8"],
         {"u16.jsonl": jsonl(LM).encode("utf-16-le")}),
    Case("dataset-pretty-printed-json-document", train("sft", "--dataset", "{tmp}/pretty.jsonl"), 2,
         ["pretty.jsonl", "one JSON document spread over several lines"], ["one JSON object per line"],
         {"pretty.jsonl": PRETTY}),
    Case("dataset-json-array-invalid", train("sft", "--dataset", "{tmp}/rows.json"), 2,
         ["rows.json", "is not valid JSON", "at line 4"], ["a .json file holds one array of row objects"],
         {"rows.json": '[\n  {"text": "a"},\n  {"text": "b"\n]\n'}),
    Case("dataset-json-array-of-strings", train("sft", "--dataset", "{tmp}/rows.json"), 2,
         ["row 1 of {tmp}/rows.json", "is a JSON string, not an object"], ["Each array item must be a row object"],
         {"rows.json": json.dumps([{"text": "a"}, "b", {"text": "c"}])}),
    # -- lines of a JSONL file
    Case("dataset-invalid-json-line", train("sft", "--dataset", "{tmp}/bad.jsonl"), 2,
         ["row 1 of {tmp}/bad.jsonl", "line 2 is not valid JSON"], ["fix or remove the line", "check-data"],
         {"bad.jsonl": '{"text": "a"}\n{"text": "b",}\n'}),
    Case("dataset-line-not-an-object", train("sft", "--dataset", "{tmp}/bad.jsonl"), 2,
         ["row 2 of {tmp}/bad.jsonl", "line 3 is a JSON list, not an object"], ["Each line must be one JSON object"],
         {"bad.jsonl": jsonl(LM[:2]) + "[1, 2]\n"}),
    Case("dataset-not-utf8-in-row-3", train("sft", "--dataset", "{tmp}/latin.jsonl"), 2,
         ["row 3 of {tmp}/latin.jsonl", "line 4 is not UTF-8 text (byte 0xe9 at column 14)"],
         ["Save the file as UTF-8"], {"latin.jsonl": NOT_UTF8_ROW_3}),
    Case("dataset-not-text", train("sft", "--dataset", "{tmp}/binary.jsonl"), 2,
         ["row 0 of {tmp}/binary.jsonl", "is not UTF-8 text"], ["Save the file as UTF-8"],
         {"binary.jsonl": b"\x81garbage\xff\n"}),
    Case("dataset-two-bad-lines-both-counted", train("sft", "--dataset", "{tmp}/two.jsonl"), 2,
         ["row 2 of {tmp}/two.jsonl", "line 3 is not valid JSON", "1 more problem in other rows"],
         ["posttrain check-data sft {tmp}/two.jsonl", "rows count from 0"], {"two.jsonl": TWO_BAD_LINES}),
    Case("csv-row-with-extra-cell", train("grpo", "--dataset", "{tmp}/p.csv", "--reward_funcs", "accuracy",
         "--num_generations", "2"), 2,
         ["row 2 of {tmp}/p.csv", "line 4 has 3 cells but the header has 2"], ["Quote cells that contain commas"],
         {"p.csv": "prompt,answer\n1+1=,2\n2+2=,4\n3+3=,6,extra\n"}),
    # -- rows
    Case("sft-data-to-dpo", train("dpo", "--dataset", "{tmp}/lm.jsonl"), 2,
         ["lm.jsonl", "columns ['text']", "looks like language_modeling"], ["reads preference: prompt+chosen+rejected"],
         {"lm.jsonl": LM}),
    Case("missing-column-in-row-3", train("dpo", "--dataset", "{tmp}/pairs.jsonl"), 2,
         ["row 3 of {tmp}/pairs.jsonl", "field 'rejected' is missing"],
         ["needs prompt+chosen+rejected", "posttrain check-data dpo {tmp}/pairs.jsonl"],
         {"pairs.jsonl": edit(PAIRS, 3, rejected=DROP)}),
    Case("non-string-field", train("dpo", "--dataset", "{tmp}/pairs.jsonl"), 2,
         ["row 5 of {tmp}/pairs.jsonl", "field 'chosen'", "got int 7"], ["Write it as a JSON string"],
         {"pairs.jsonl": edit(PAIRS, 5, chosen=7)}),
    Case("number-among-strings-never-coerced", train("grpo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs",
         "accuracy", "--num_generations", "2"), 2, ["row 5 of {tmp}/p.jsonl", "field 'answer' is a number (6) but a string in row 0"],
         ['write "6"', "nothing is converted for you"], {"p.jsonl": MIXED_ANSWER}),
    Case("empty-completion", train("sft", "--dataset", "{tmp}/pc.jsonl"), 2,
         ["row 2 of {tmp}/pc.jsonl", "field 'completion' is empty"], ["Remove the row or fill in the field"],
         {"pc.jsonl": edit(PROMPT_COMPLETION, 2, completion="")}),
    Case("whitespace-only-completion", train("sft", "--dataset", "{tmp}/pc.jsonl"), 2,
         ["row 6 of {tmp}/pc.jsonl", "field 'completion' is empty"], ["Remove the row or fill in the field"],
         {"pc.jsonl": edit(PROMPT_COMPLETION, 6, completion="  \n ")}),
    Case("unknown-role", train("sft", "--dataset", "{tmp}/chat.jsonl"), 2,
         ["row 4 of {tmp}/chat.jsonl", "field 'messages'", "unknown role 'human'"],
         ["Use one of: system, user, assistant"],
         {"chat.jsonl": edit(CHAT, 4, messages=[{"role": "human", "content": "hi"}])}),
    Case("message-not-a-mapping", train("sft", "--dataset", "{tmp}/chat.jsonl"), 2,
         ["row 1 of {tmp}/chat.jsonl", "message 0 is not a {{'role', 'content'}} mapping"], ['{{"role": ..., "content"'],
         {"chat.jsonl": edit(CHAT, 1, messages=["hi"])}),
    Case("label-not-boolean", train("kto", "--dataset", "{tmp}/kto.jsonl"), 2,
         ["row 6 of {tmp}/kto.jsonl", "field 'label'", "'yes'"], ["true or false"],
         {"kto.jsonl": edit(UNPAIRED, 6, label="yes")}),
    Case("standard-and-conversational-in-one-row", train("dpo", "--dataset", "{tmp}/pairs.jsonl"), 2,
         ["row 2 of {tmp}/pairs.jsonl", "field 'prompt' is a list of messages while 'chosen' is a string"],
         ["Use strings for prompt, chosen and rejected"],
         {"pairs.jsonl": edit(PAIRS, 2, prompt=[{"role": "user", "content": "Q"}])}),
    Case("every-prompt-longer-than-max-length", train("dpo", "--dataset", "{tmp}/long.jsonl", "--max_length", "8"),
         2, ["{tmp}/long.jsonl", "no usable rows", "dropped 8 of 8 rows"], ["Raise max_length"],
         {"long.jsonl": [{**r, "prompt": "a long prompt " * 3} for r in PAIRS]}),
    Case("conversational-rows-without-chat-template", train("sft", "--dataset", "{tmp}/chat.jsonl", "--model",
         "{notemplate}"), 2, ["{tmp}/chat.jsonl", "conversational but the tokenizer has no chat template"],
         ["set tokenizer.chat_template"], {"chat.jsonl": CHAT}),
    # -- handled, with a warning or silently right
    Case("chosen-equals-rejected-warns-naming-rows", train("dpo", "--dataset", "{tmp}/pairs.jsonl"), 0,
         ["{tmp}/pairs.jsonl: 2 row(s)", "'chosen/rejected' are identical", "rows 2, 6"],
         ["Remove the row or fix one of the answers"], {"pairs.jsonl": SAME_PAIR}),
    Case("prompt-longer-than-max-length-dropped-with-a-warning", train("dpo", "--dataset", "{tmp}/pairs.jsonl",
         "--max_length", "12"), 0, ["dropped 1 of 9 rows (first: row 1)", "max_length=12"], ["Raise max_length"],
         {"pairs.jsonl": edit(PAIRS, 1, prompt="a long prompt " * 3) + PAIRS[:1]}),
    Case("utf8-byte-order-mark-is-skipped", train("sft", "--dataset", "{tmp}/bom.jsonl"), 0, ["done: 2 steps"], [],
         {"bom.jsonl": BOM_UTF8}),
    Case("utf16-with-byte-order-mark-is-read", train("sft", "--dataset", "{tmp}/u16.jsonl"), 0, ["done: 2 steps"],
         [], {"u16.jsonl": UTF16}),
    Case("json-array-file-is-read", train("sft", "--dataset", "{tmp}/rows.json"), 0, ["done: 2 steps"], [],
         {"rows.json": json.dumps(LM, indent=1)}),
    Case("csv-cells-stay-text", train("grpo", "--dataset", "{tmp}/p.csv", "--reward_funcs", "accuracy",
         "--num_generations", "2", "--max_completion_length", "2", "--per_device_train_batch_size", "4"), 0,
         ["done: 2 steps"], [], {"p.csv": CSV_PROMPTS}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_data_case(case, paths, watched, monkeypatch):
    run_case(case, paths, monkeypatch, watched)


def test_rows_are_never_coerced_to_numbers(paths, monkeypatch):
    """A CSV cell "14" reaches the reward function as the string "14"; JSON keeps each value's own type."""
    from posttrain import _reader

    (paths["tmp"] / "p.csv").write_text(CSV_PROMPTS)
    table = _reader.read_file(paths["tmp"] / "p.csv")
    assert [row["answer"] for row in table.rows] == [str(i + 1) for i in range(8)]
    (paths["tmp"] / "p.jsonl").write_text(jsonl(edit(PROMPTS, 0, answer="14")))
    dataset = _reader.to_dataset(_reader.read_file(paths["tmp"] / "p.jsonl"))
    assert dataset[0]["answer"] == "14" and dataset[1]["answer"] == "2"


# -- train and check-data agree on every file -------------------------------------------------------------------

AGREEMENT = {
    "ok.jsonl": (LM, []),
    "bom.jsonl": (BOM_UTF8, []),
    "utf16.jsonl": (UTF16, []),
    "array.json": (json.dumps(LM), []),
    "lines.json": (jsonl(LM), []),
    "latin.jsonl": (NOT_UTF8_ROW_3, [3]),
    "two-bad-lines.jsonl": (TWO_BAD_LINES, [2, 6]),
    "malformed-and-missing.jsonl": (jsonl(edit(LM, 1, text=DROP)[:4]) + "{oops\n" + jsonl(LM[4:]), [1, 4]),
    "mixed-types.jsonl": (edit(LM, 3, text=5), [3]),
    "array-with-a-string.json": (json.dumps([*LM[:2], "x", *LM[3:]]), [2]),
    "bad-cells.csv": ("text\n" + "".join(f"h{i}\n" for i in range(4)) + "a,b\n" + "h5\nh6\nh7\n", [4]),
}


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_train_and_check_data_agree(name, paths):
    content, bad_rows = AGREEMENT[name]
    write_files({name: content}, paths)
    data = paths["tmp"] / name
    checked = cli("check-data", "sft", data, "--json")
    assert checked.code == (1 if bad_rows else 0), checked.out + checked.err
    report = json.loads(checked.out)
    assert sorted({p["row"] for p in report["problems"]}) == bad_rows
    trained = cli("train", "sft", "--model", paths["model"], "--dataset", data, "--output_dir", paths["tmp"] / "out",
                  "--max_steps", "1", "--per_device_train_batch_size", "2", "--disable_progress_bar")  # fmt: skip
    assert "Traceback" not in trained.err
    assert trained.code == (2 if bad_rows else 0), trained.err
    if bad_rows:
        assert f"row {bad_rows[0]} of {data}" in trained.err
        more = len(report["problems"]) - 1
        assert (f"({more} more problem" in trained.err) == (more > 0)


def test_check_data_lists_every_bad_row_and_says_how_rows_count(paths):
    data = paths["tmp"] / "two.jsonl"
    data.write_text(TWO_BAD_LINES.replace('{"text": "hello world 6"}', '{"txt": "hello world 6"}'))
    checked = cli("check-data", "sft", data)
    lines = [line for line in checked.out.splitlines() if line.startswith("row ")]
    assert [line.split()[1] for line in lines] == ["2", "6", "8"], checked.out
    assert "rows count from 0" in checked.out and checked.code == 1


def test_check_data_reports_degenerate_rows_as_warnings(paths):
    data = paths["tmp"] / "pairs.jsonl"
    data.write_text(jsonl(SAME_PAIR))
    checked = cli("check-data", "dpo", data)
    assert checked.code == 0, checked.out
    assert "warning: row 2 of pairs.jsonl: field 'chosen/rejected' are identical" in checked.out
    assert "warning: row 6 of pairs.jsonl" in checked.out and "2 warning(s)" in checked.out


@pytest.mark.parametrize(
    "env, said",
    [({"HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1 cannot be reached"), ({"HF_HUB_OFFLINE": "1"}, "tried as")],
    ids=["no-network", "offline"],
)
def test_dataset_hub_name_without_hub_fails_fast(env, said, paths, watched, monkeypatch):
    """A name shaped like a hub dataset, with no network or in offline mode: one line, in seconds, no retries."""
    import time

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(paths["tmp"])
    case = Case(f"dataset-hub-name-{said}", train("sft", "--dataset", "someorg/somedata"), 2,
                ["dataset 'someorg/somedata'", "not a local file or directory", said], ["Check the"])  # fmt: skip
    start = time.monotonic()
    run_case(case, paths, monkeypatch, watched)
    assert time.monotonic() - start < 20


def test_a_column_missing_from_the_first_row_is_a_row_problem(paths):
    """Columns are the union over rows (as `datasets` builds them), so row 0 lacking 'rejected' is row 0's
    problem in both commands, not "the file lacks the column"."""
    data = paths["tmp"] / "pairs.jsonl"
    data.write_text(jsonl(edit(PAIRS, 0, rejected=DROP)))
    checked = cli("check-data", "dpo", data)
    assert checked.code == 1 and "row 0 of pairs.jsonl: field 'rejected' is missing" in checked.out
