"""Preference data: exact token ids and collator tensors, truncation sides, and row-level errors.

Token ids are spelled out independently of the tokenizer call: the tiny tokenizer maps each character
to one id, and the special tokens <pad>=0, <|end|>=1 (EOS), <|user|>=3, <|assistant|>=4.
"""

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain_dpo import DPO, DPOConfig
from posttrain_dpo.data import collate_pairs, tokenize_dataset, tokenize_row

PAD, EOS, USER, ASSISTANT = 0, 1, 3, 4


@pytest.fixture
def ids(dpo_tokenizer):
    return lambda text: [dpo_tokenizer.convert_tokens_to_ids(c) for c in text]


def test_collate_builds_chosen_then_rejected_with_right_padding():
    rows = [
        {"prompt_ids": [11, 12, 13], "chosen_ids": [14, 15], "rejected_ids": [16]},
        {"prompt_ids": [17, 18], "chosen_ids": [19], "rejected_ids": [20, 21]},
    ]
    batch = collate_pairs(rows, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 14, 15],
        [17, 18, 19, 0, 0],
        [11, 12, 13, 16, 0],
        [17, 18, 20, 21, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}


def test_collate_cuts_the_end_of_each_sequence_before_padding():
    rows = [
        {"prompt_ids": [11, 12, 13], "chosen_ids": [14, 15], "rejected_ids": [16]},
        {"prompt_ids": [17, 18], "chosen_ids": [19], "rejected_ids": [20, 21]},
    ]
    batch = collate_pairs(rows, pad_token_id=PAD, max_length=4)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [17, 18, 19, 0], [11, 12, 13, 16], [17, 18, 20, 21]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_collate_carries_precomputed_reference_logps():
    rows = [
        {
            "prompt_ids": [5],
            "chosen_ids": [6],
            "rejected_ids": [7],
            "ref_chosen_logps": -1.25,
            "ref_rejected_logps": -2.5,
        }
    ] * 2
    batch = collate_pairs(rows, pad_token_id=PAD)
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.25, -1.25] and batch["ref_rejected_logps"].tolist() == [-2.5, -2.5]


def test_standard_row_gets_eos_once(dpo_tokenizer, ids):
    row = {"prompt": "Q:", "chosen": " yes", "rejected": " no<|end|>"}
    out = tokenize_row(row, dpo_tokenizer)
    assert out == {"prompt_ids": ids("Q:"), "chosen_ids": [*ids(" yes"), EOS], "rejected_ids": [*ids(" no"), EOS]}


def test_conversational_row_uses_the_chat_template(dpo_tokenizer, ids):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "ok"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    out = tokenize_row(row, dpo_tokenizer)
    assert out["prompt_ids"] == [USER, *ids("hi"), EOS, ASSISTANT]
    assert out["chosen_ids"] == [*ids("ok"), EOS] and out["rejected_ids"] == [*ids("no"), EOS]


def test_implicit_prompts_are_extracted(dpo_tokenizer, ids):
    standard = tokenize_row({"chosen": "Say hi: yes", "rejected": "Say hi: no"}, dpo_tokenizer)
    assert standard == {  # the space before the answers goes with them, as TRL splits
        "prompt_ids": ids("Say hi:"),
        "chosen_ids": [*ids(" yes"), EOS],
        "rejected_ids": [*ids(" no"), EOS],
    }
    user = {"role": "user", "content": "hi"}
    conversational = tokenize_row(
        {
            "chosen": [user, {"role": "assistant", "content": "ok"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        dpo_tokenizer,
    )
    assert conversational["prompt_ids"] == [USER, *ids("hi"), EOS, ASSISTANT]
    assert conversational["chosen_ids"] == [*ids("ok"), EOS]


def test_max_prompt_length_cuts_the_start_of_the_prompt(dpo_tokenizer, ids):
    out = tokenize_row({"prompt": "abcdef", "chosen": "x", "rejected": "y"}, dpo_tokenizer, max_prompt_length=2)
    assert out["prompt_ids"] == ids("ef") and out["chosen_ids"] == [*ids("x"), EOS]


def test_rows_whose_prompt_fills_max_length_are_dropped_with_a_warning(dpo_tokenizer):
    rows = [{"prompt": "abcdefgh", "chosen": "x", "rejected": "y"}, {"prompt": "ab", "chosen": "x", "rejected": "y"}]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 rows \(first: row 0\).*max_length=8"):
        kept = tokenize_dataset(datasets.Dataset.from_list(rows), dpo_tokenizer, max_length=8, max_prompt_length=None)
    assert len(kept) == 1 and len(kept[0]["prompt_ids"]) == 2


GOOD = {"prompt": "Q:", "chosen": " a", "rejected": " b"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        ({"prompt": "Q:", "chosen": " a", "rejected": None}, "rejected", "is missing"),
        ({"prompt": "Q:", "chosen": " a", "rejected": "   "}, "rejected", "is empty"),
        ({"prompt": "Q:", "chosen": 7, "rejected": " b"}, "chosen", "must be a string or a list of messages"),
        (
            {"prompt": MSG, "chosen": " a", "rejected": " b"},
            "prompt",
            "is a list of messages while 'chosen' is a string",
        ),
        (
            {
                "prompt": [{"role": "robot", "content": "x"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "unknown role 'robot'",
        ),
    ],
)
def test_bad_rows_raise_naming_row_and_field(dpo_tokenizer, bad, field, words):
    rows = [dict(GOOD), dict(GOOD), bad, dict(GOOD)]
    with pytest.raises(DataError) as info:
        tokenize_dataset(rows, dpo_tokenizer, max_length=64, max_prompt_length=None)
    text = str(info.value)
    assert "row 2" in text and f"'{field}'" in text and words in text, text


def test_check_rows_lists_every_bad_row():
    rows = datasets.Dataset.from_list([GOOD, {**GOOD, "chosen": None}, GOOD, {**GOOD, "rejected": None}])
    problems = DPO().check_rows(rows)
    assert [(p.row, p.field) for p in problems] == [(1, "chosen"), (3, "rejected")]
    assert all(isinstance(p, RowProblem) and p.problem == "is missing" for p in problems)


def test_prepare_refuses_exactly_the_rows_check_rows_reports(dpo_ctx):
    """check-data (no model, no tokenizer) and training agree: the same RowProblems, every one of them."""
    rows = [
        GOOD,
        {**GOOD, "chosen": None},
        GOOD,
        {**GOOD, "prompt": MSG},
        {**GOOD, "rejected": " "},
        GOOD,
    ]
    reported = DPO().check_rows(rows)  # as check-data reads a JSONL file: a list of dicts, mixed types allowed
    assert [p.row for p in reported] == [1, 3, 4]
    with pytest.raises(DataError) as info:
        DPO().prepare(rows, dpo_ctx())
    assert info.value.problems == reported and info.value.method == "dpo"
    assert "(2 more problems in other rows.)" in str(info.value) and "posttrain check-data dpo" in str(info.value)
    good = [rows[i] for i in (0, 2, 5)]
    assert DPO().check_rows(datasets.Dataset.from_list(good)) == []
    assert len(DPO().prepare(datasets.Dataset.from_list(good), dpo_ctx())) == 3


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        from posttrain.config import build_config

        build_config(
            DPOConfig,
            {
                "beta": 0,
                "loss_type": ["sigmoid", "ipo"],
                "loss_weights": [1.0],
                "label_smoothing": 0.5,
                "reference_free": True,
                "precompute_ref_log_probs": True,
                "max_length": 16,
                "max_prompt_length": 16,
            },
        )
    problems = info.value.problems
    for words in (
        "beta must be > 0",
        "loss_weights has 1 entries",
        "label_smoothing must be in [0, 0.5)",
        "reference_free and precompute_ref_log_probs",
        "max_prompt_length (16) must be smaller",
    ):
        assert any(words in p for p in problems), (words, problems)


def test_config_rejects_unknown_loss_types_and_duplicates():
    from posttrain.config import load_config

    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        load_config(DPOConfig, None, {"loss_type": "sigmoi"})
    with pytest.raises(ConfigError, match="more than once"):
        load_config(DPOConfig, None, {"loss_type": "sigmoid,sigmoid"})
    assert load_config(DPOConfig, None, {"loss_type": "sigmoid,sft", "loss_weights": "1,0.5"}).loss_weights == [
        1.0,
        0.5,
    ]


def test_shipped_yaml_and_dataset_are_valid(dpo_tokenizer):
    from pathlib import Path

    from posttrain.config import load_config
    from posttrain.data import load_dataset

    here = Path(__file__).parents[1] / "configs"
    config = load_config(DPOConfig, here / "tiny.yaml")
    assert config.loss_type == ["sigmoid"] and config.max_length == 64
    assert (here / "tiny.yaml").read_text().startswith("# posttrain train dpo --config")
    rows = tokenize_dataset(
        load_dataset(str(here / "tiny.jsonl")), dpo_tokenizer, config.max_length, config.max_prompt_length
    )
    assert len(rows) == 32
