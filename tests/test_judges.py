"""Pairwise judges (posttrain.rewards.judge / Judge): marking, resolution by name, typed options, calling, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from posttrain import ConfigError, TrainContext, hookimpl
from posttrain.config import TrainingConfig
from posttrain.rewards import Judge, JudgeError, RewardSet, is_judge, judge


@judge
def shorter(prompts, completions, **columns):
    """The shorter completion wins; no preference on equal lengths."""
    return [None if len(a) == len(b) else 0 if len(a) < len(b) else 1 for a, b in completions]


@dataclass
class PreferOptions:
    letter: str = "a"  # the completion holding more of this letter wins


@judge(options=PreferOptions)
def prefers(prompts, completions, *, options, **columns):
    return [0 if a.count(options.letter) >= b.count(options.letter) else 1 for a, b in completions]


def score(prompts, completions, **columns):
    return [1.0] * len(completions)


def test_both_decorator_forms_mark_a_judge_and_only_dataclasses_are_options():
    assert is_judge(shorter) and is_judge(prefers) and not is_judge(score)
    with pytest.raises(TypeError, match="needs a dataclass"):
        judge(options=dict)


def test_compare_returns_the_winner_of_each_pair_and_nan_for_no_preference():
    out = Judge("shorter", shorter).compare(["p", "q", "r"], [["a", "bb"], ["ccc", "d"], ["e", "f"]])
    assert out[:2].tolist() == [0.0, 1.0] and math.isnan(out[2])


def test_typed_options_come_from_judge_kwargs_with_did_you_mean():
    j = Judge.resolve("prefers", {"letter": "b"}, given={"prefers": prefers})
    assert j.compare(["p"], [["ab", "bb"]]).tolist() == [1.0]
    assert Judge.resolve("prefers", given={"prefers": prefers}).compare(["p"], [["ab", "bb"]]).tolist() == [0.0]
    with pytest.raises(ConfigError, match="did you mean 'letter'"):
        Judge.resolve("prefers", {"leter": "b"}, given={"prefers": prefers})
    with pytest.raises(ConfigError, match="declares none"):
        Judge.resolve("shorter", {"x": 1}, given={"shorter": shorter})


def test_a_reward_function_is_not_a_judge_and_a_judge_is_not_a_reward_function():
    with pytest.raises(
        ConfigError, match=r"'score' is a reward function, not a pairwise judge.*reward_funcs: \[score\]"
    ):
        Judge.resolve("score", given={"score": score}, method="online-dpo")
    with pytest.raises(ConfigError, match="reward_funcs names 'shorter', a pairwise judge"):
        RewardSet.resolve(["score", "shorter"], given={"score": score, "shorter": shorter})
    # with no names, every callable given to the run is a reward function, except the judges among them
    assert RewardSet.resolve([], given={"score": score, "shorter": shorter}).names == ["score"]


def test_columns_and_completion_ids_reach_a_judge_that_declares_them():
    seen = {}

    @judge
    def strict(prompts, completions, answer):  # no **columns: gets no completion_ids
        seen["answer"] = answer
        return [0] * len(completions)

    @judge
    def wants_ids(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [0 if len(a) >= len(b) else 1 for a, b in completion_ids]

    pairs, ids = [["a", "b"], ["c", "d"]], [[[4, 1], [5]], [[6], [7, 8, 1]]]
    Judge("strict", strict).compare(["p", "q"], pairs, {"answer": ["1", "2"]}, ids)
    out = Judge("ids", wants_ids).compare(["p", "q"], pairs, {"answer": ["1", "2"]}, ids)
    assert seen == {"answer": ["1", "2"], "ids": ids} and out.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([0], "returned 1 values for 2 pairs"),
        ([0, 2], "returned 2 for the pair of dataset row 8 at step 3"),
        ([True, 0], "returned True for the pair of dataset row 7"),
        ([0, "1"], "returned '1' for the pair of dataset row 8"),
    ],
)
def test_wrong_counts_and_values_other_than_0_1_none_are_errors(values, match):
    with pytest.raises(JudgeError, match=match):
        Judge("j", lambda prompts, completions: values).compare(["p", "q"], [["a", "b"]] * 2, row_index=[7, 8], step=3)


def test_a_failing_judge_is_named_with_the_row_the_step_and_the_line():
    @judge
    def picky(prompts, completions, **columns):
        return [1 // 0 if "bad" in pair else 0 for pair in completions]

    with pytest.raises(JudgeError) as info:
        Judge("picky", picky).compare(["p", "q"], [["ok", "ok"], ["ok", "bad"]], row_index=[4, 9], step=2)
    text = str(info.value)
    assert "'picky'" in text and "dataset row 9 at step 2" in text and "ZeroDivisionError" in text
    assert "test_judges.py:" in text


class _Judges:
    @hookimpl
    def posttrain_register_rewards(self, registry):
        registry.add("hooked_judge", shorter)


def test_judges_resolve_through_hooks_and_entry_points_and_land_in_the_context(fake_site):
    from posttrain import _registry

    _registry.plugin_manager(load_entry_points=False).register(_Judges(), name="test-judges")
    ctx = TrainContext(config=TrainingConfig())
    assert Judge.resolve("hooked_judge", ctx=ctx).compare(["p"], [["aa", "b"]]).tolist() == [1.0]
    fake_site.add(
        "acme-judges",
        rewards={"longest": "acme_judges:longest"},
        module="acme_judges",
        code="""
        from posttrain.rewards import judge

        @judge
        def longest(prompts, completions, **columns):
            return [0 if len(a) >= len(b) else 1 for a, b in completions]
        """,
    )
    assert Judge.resolve("longest", ctx=ctx).compare(["p"], [["aa", "b"]]).tolist() == [0.0]
    assert sorted(ctx.rewards) == ["hooked_judge", "longest"]
