"""accuracy, format and length_penalty on hand-made completions."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from posttrain_rewards import (
    DEFAULT_FORMAT_PATTERN,
    accuracy,
    final_number,
    format_reward,
    length_penalty,
    make_format_reward,
    make_length_penalty,
)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 42.", Decimal(42)),
        ("3 apples, then 1,234.50 total", Decimal("1234.50")),
        ("it fell to -7", Decimal(-7)),
        (r"first 3 then \boxed{12} and 5", Decimal(12)),
        ("#### 72", Decimal(72)),
        ("no digits", None),
        ("costs .5", Decimal("0.5")),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_accuracy_compares_final_numbers_with_the_answer_column():
    completions = ["so 2+2 is 4", "I think 5", "4.0", " Four ", "nothing", "x = 9"]
    answers = ["4", "4", "4", "four", None, "Natalia sold 48 ... #### 9"]
    assert accuracy(["q"] * 6, completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, None, 1.0]


def test_accuracy_reads_solution_and_conversational_completions():
    completions = [[{"role": "assistant", "content": r"\boxed{3}"}], [{"role": "assistant", "content": "2"}]]
    assert accuracy([[{"role": "user", "content": "1+2?"}]] * 2, completions, solution=["3", "3"]) == [1.0, 0.0]


def test_accuracy_without_a_reference_column_says_which_columns_exist():
    with pytest.raises(ValueError, match=r"'answer' \(or 'solution'\).*\['level'\]"):
        accuracy(["q"], ["1"], level=["easy"])


def test_format_default_pattern_and_its_sources(monkeypatch):
    from posttrain.rewards import RewardSet

    good, bad = "<think>hmm</think>\n<answer>4</answer>", "<answer>4</answer>"
    assert format_reward(["q", "q"], [good, bad]) == [1.0, 0.0]
    assert re.fullmatch(DEFAULT_FORMAT_PATTERN, good, re.DOTALL)
    configured = RewardSet.resolve(
        ["format"], kwargs={"format": {"pattern": r"<answer>\d+</answer>"}}, given={"format": format_reward}
    )
    assert configured.score(["q", "q"], [good, bad]).flatten().tolist() == [0.0, 1.0]
    # a per-row column wins over the options
    assert configured.score(["q", "q"], [good, bad], {"format_pattern": [r"<think>.*", None]}).flatten().tolist() == [
        1.0,
        1.0,
    ]
    monkeypatch.setenv("POSTTRAIN_FORMAT_PATTERN", r"<answer>\d+</answer>")  # 1.x: still read, deprecated
    with pytest.warns(FutureWarning, match="reward_kwargs"):
        assert format_reward(["q", "q"], [good, bad]) == [0.0, 1.0]


def test_make_format_reward_on_conversational_completions():
    boxed = make_format_reward(r".*\\boxed\{.+\}.*")
    completions = [[{"role": "assistant", "content": r"so \boxed{4}"}], [{"role": "assistant", "content": "4"}]]
    assert boxed(["q", "q"], completions) == [1.0, 0.0] and boxed.pattern == r".*\\boxed\{.+\}.*"


def test_length_penalty_is_dapo_soft_overlong_punishment():
    """L_max = 10, L_cache = 4: lengths <= 6 -> 0; 8 -> (6 − 8)/4 = −0.5; 10 -> −1; 11 -> −1 (over L_max)."""
    penalty = make_length_penalty(10, 4)
    ids = [[0] * n for n in (3, 6, 8, 10, 11)]
    assert penalty([""] * 5, [""] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert penalty([""], ["abcdefgh"]) == [-0.5]  # no token ids: characters are counted


def test_length_penalty_defaults_options_and_deprecated_environment(monkeypatch):
    from posttrain.rewards import RewardSet

    # 512,128: free up to 384 tokens, then (384 − 400) / 128 = −0.125
    assert length_penalty([""] * 2, [""] * 2, completion_ids=[[0] * 384, [0] * 400]) == [0.0, -0.125]
    configured = RewardSet.resolve(
        ["length_penalty"],
        kwargs={"length_penalty": {"max_completion_len": 10, "soft_punish_cache": 4}},
        given={"length_penalty": length_penalty},
    )
    assert configured.score([""], [""], completion_ids=[[0] * 8]).item() == -0.5
    monkeypatch.setenv("POSTTRAIN_LENGTH_PENALTY", "10,4")
    with pytest.warns(FutureWarning):
        assert length_penalty([""], [""], completion_ids=[[0] * 8]) == [-0.5]
    monkeypatch.setenv("POSTTRAIN_LENGTH_PENALTY", "ten")
    with pytest.raises(ValueError, match="'MAX,CACHE'"), pytest.warns(FutureWarning):
        length_penalty([""], [""])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        make_length_penalty(4, 8)
