"""Tokenization (the scoring convention), implicit prompts, long pairs, the collator's exact tensors, row errors."""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem, TrainContext
from posttrain.config import build_config, load_config
from posttrain_reward import Reward, RewardConfig, collate_pairs, encode, prepare_pairs


def ids(tok, text: str) -> list[int]:
    """The character tokenizer's ids, one per character."""
    return tok.convert_tokens_to_ids(list(text))


def with_eos(tok, text: str) -> list[int]:
    return [*ids(tok, text), tok.eos_token_id]


def test_standard_rows_are_prompt_plus_response_plus_eos(reward_tokenizer):
    tok = reward_tokenizer
    assert encode(tok, "Hi", " yo") == with_eos(tok, "Hi yo")
    assert encode(tok, "Hi", " yo<|end|>") == with_eos(tok, "Hi yo")  # no second EOS
    assert encode(tok, None, "yo") == with_eos(tok, "yo")


def test_conversational_rows_use_the_chat_template(reward_tokenizer):
    tok = reward_tokenizer
    prompt = [{"role": "user", "content": "2+2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    rendered = tok.apply_chat_template(prompt + answer, tokenize=False)
    assert rendered == "<|user|>2+2?<|end|><|assistant|>4<|end|>"
    assert encode(tok, prompt, answer) == tok(rendered, add_special_tokens=False).input_ids


def test_implicit_prompt_gives_the_same_ids_as_explicit(reward_tokenizer):
    explicit = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    chat = [
        {
            "chosen": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "green"}],
        }
    ]
    chat_explicit = [
        {
            "prompt": [{"role": "user", "content": "sky?"}],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "green"}],
        }
    ]
    for a, b in ((explicit, implicit), (chat, chat_explicit)):
        rows_a, _ = prepare_pairs(datasets.Dataset.from_list(a), reward_tokenizer, None)
        rows_b, _ = prepare_pairs(datasets.Dataset.from_list(b), reward_tokenizer, None)
        assert rows_a == rows_b


def test_collator_exact_tensors():
    """[all chosen; all rejected], right-padded; the same tensors as TRL's DataCollatorForPreference docstring."""
    rows = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
        {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0},
    ]
    batch = collate_pairs(rows, pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]))
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))
    no_margin = collate_pairs([{k: v for k, v in r.items() if k != "margin"} for r in rows], pad_token_id=9)
    assert set(no_margin) == {"input_ids", "attention_mask"} and no_margin["input_ids"][3].tolist() == [8, 9, 9]


def long_rows():
    # ids per side: prompt 4 + response + EOS -> chosen 7/10/6 tokens, rejected 6/6/12
    return datasets.Dataset.from_list(
        [
            {"prompt": "abcd", "chosen": "ef", "rejected": "g"},
            {"prompt": "abcd", "chosen": "efghi", "rejected": "g"},
            {"prompt": "abcd", "chosen": "e", "rejected": "ghijklm"},
        ]
    )


def test_filter_drops_pairs_with_either_side_over_max_length(reward_tokenizer):
    """TRL 1.16 semantics: a pair is kept when both sides have <= max_length tokens (7 is kept at max_length 7)."""
    rows, n_filtered = prepare_pairs(long_rows(), reward_tokenizer, max_length=7, truncation_mode="filter")
    assert n_filtered == 2 and len(rows) == 1
    assert rows[0]["chosen_ids"] == with_eos(reward_tokenizer, "abcdef")
    assert prepare_pairs(long_rows(), reward_tokenizer, max_length=None)[1] == 0


def test_keep_end_cuts_the_start_and_keeps_the_scored_token(reward_tokenizer):
    tok = reward_tokenizer
    rows, n_filtered = prepare_pairs(long_rows(), tok, max_length=7, truncation_mode="keep_end")
    assert n_filtered == 0 and len(rows) == 3
    assert rows[1]["chosen_ids"] == with_eos(tok, "defghi")  # "abc" of the prompt cut
    assert rows[1]["rejected_ids"] == with_eos(tok, "abcdg")  # short side untouched
    assert rows[2]["rejected_ids"] == with_eos(tok, "hijklm")  # the scored EOS is kept ...
    rows, _ = prepare_pairs(long_rows(), tok, max_length=4, truncation_mode="keep_end")
    assert all(r["chosen_ids"][-1] == tok.eos_token_id for r in rows)  # ... at any max_length
    assert all(len(r["chosen_ids"]) <= 4 and len(r["rejected_ids"]) <= 4 for r in rows)


def test_prepare_reports_when_everything_is_filtered(reward_tokenizer):
    config = build_config(RewardConfig, {"max_length": 3})
    ctx = TrainContext(config=config, tokenizer=reward_tokenizer)
    with pytest.raises(DataError, match=r"all 3 pairs .* longer than max_length=3.*keep_end"):
        Reward().prepare(long_rows(), ctx)


def test_prepare_says_how_many_pairs_were_dropped(reward_tokenizer, capsys):
    ctx = TrainContext(config=build_config(RewardConfig, {"max_length": 7}), tokenizer=reward_tokenizer)
    assert len(Reward().prepare(long_rows(), ctx)) == 1
    assert "dropped 2 of 3 pairs longer than max_length=7" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
            r"row 1 .*'rejected' is missing",
        ),
        ([{"prompt": "p", "chosen": "a", "rejected": ""}], r"row 0 .*'rejected' is empty"),
        (
            [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}],
            r"row 0 .*field 'prompt' is a list of messages but 'chosen' is a string",
        ),
        (
            [{"chosen": "a b", "rejected": "a c", "margin": 1.0}, {"chosen": "a b", "rejected": "a c", "margin": None}],
            r"row 1 .*'margin' must be a finite number, got None",
        ),
        ([{"chosen": "a b", "rejected": "a c", "margin": float("nan")}], r"row 0 .*'margin' .* got nan"),
        ([{"completion": "a", "label": True}], r"row 0 .*missing"),
    ],
)
def test_bad_rows_name_row_and_field(reward_tokenizer, rows, match):
    with pytest.raises(DataError, match=match):
        prepare_pairs(datasets.Dataset.from_list(rows), reward_tokenizer, 64)


def test_check_rows_lists_every_bad_row():
    rows = [
        {"chosen": "a b", "rejected": "a c", "margin": 1.0},
        {"chosen": "a b", "rejected": "a c", "margin": "x"},
        {"chosen": "a b", "rejected": "a d", "margin": None},
    ]  # a plain list: Arrow would refuse "x"
    problems = Reward().check_rows(rows)
    assert [(p.row, p.field) for p in problems] == [(1, "margin"), (2, "margin")]
    assert all(isinstance(p, RowProblem) for p in problems)
    assert "got 'x'" in problems[0].problem and "got None" in problems[1].problem
    assert Reward().check_rows(rows[:1]) == []


def test_prepare_refuses_exactly_the_rows_check_rows_reports(reward_tokenizer):
    """check-data (no model, no tokenizer) and training agree: every bad row, core's problems and the reward's."""
    message = [{"role": "user", "content": "q"}]
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5},
        {"prompt": message, "chosen": "a", "rejected": "b", "margin": 0.5},
        {"prompt": "p", "chosen": "a", "rejected": "", "margin": 0.5},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")},
    ]
    reported = Reward().check_rows(rows)
    assert [(p.row, p.field) for p in reported] == [(1, "prompt"), (2, "rejected"), (3, "margin")]
    with pytest.raises(DataError) as info:
        prepare_pairs(rows, reward_tokenizer, 64)
    assert info.value.problems == reported and info.value.method == "reward"
    assert "(2 more problems in other rows.)" in str(info.value)
    assert len(prepare_pairs(rows[:1], reward_tokenizer, 64)[0]) == 1


def test_conversational_rows_need_a_chat_template(reward_tokenizer):
    from posttrain.testing import build_tokenizer

    bare = build_tokenizer()
    bare.chat_template = None
    rows = [{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match="no chat template"):
        prepare_pairs(datasets.Dataset.from_list(rows), bare, 64)


def test_config_checks_and_shipped_yaml():
    with pytest.raises(ConfigError) as info:
        build_config(RewardConfig, {"max_length": 1, "center_rewards_coefficient": -1.0})
    text = str(info.value)
    assert "max_length must be >= 2" in text and "center_rewards_coefficient" in text
    with pytest.raises(ConfigError, match="filter"):
        build_config(RewardConfig, {"truncation_mode": "keep_start"})
    from pathlib import Path

    yaml_path = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    assert yaml_path.read_text().startswith("# posttrain train reward --config")
    config = load_config(RewardConfig, yaml_path)
    assert config.learning_rate > 0 and config.max_length
