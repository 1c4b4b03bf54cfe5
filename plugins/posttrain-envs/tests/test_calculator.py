"""The calculator: exact, safe arithmetic, and the environment's steps (tool calls, malformed calls, answers)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from posttrain.environments import ToolCallParser
from posttrain_envs import Calculator, calculate, evaluate
from posttrain_envs.calculator import final_number

CALL = ToolCallParser()


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("37*48", 1776),
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("1/3 + 1/6", Fraction(1, 2)),
        ("0.1 + 0.2", Fraction(3, 10)),
    ],
)
def test_evaluate_is_exact(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os')", "only numbers"),
        ("x + 1", "only numbers"),
        ("9 ** 9 ** 9", "exponents must be whole numbers up to 64"),
        ("2 ** 0.5", "exponents must be whole numbers"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 201, "longer than 200"),
        ("'a' * 3", "only numbers"),
    ],
)
def test_evaluate_refuses_anything_else(expression, reason):
    with pytest.raises(ValueError, match=reason):
        evaluate(expression)


def test_calculate_shows_integers_and_rounded_decimals():
    assert calculate("37*48") == "1776" and calculate("7/4") == "1.75" and calculate("1/3") == "0.333333"


def test_final_number():
    assert final_number("so 12 and then 1776") == "1776" and final_number("-3.5") == "-3.5"
    assert final_number("none") is None


def play_turns(env: Calculator, *texts: str):
    env.reset({"prompt": "37*48", "answer": 1776}, seed=0)
    return [env.step(CALL.parse(text, env.tools, index=i)) for i, text in enumerate(texts)]


def test_a_tool_call_comes_back_as_a_tool_message_and_the_answer_ends_the_episode():
    call, answer = play_turns(Calculator(), CALL.format("calculate", {"expression": "37*48"}), "It is 1776.")
    assert call.observation == [{"role": "tool", "name": "calculate", "content": "1776"}] and not call.done
    assert call.reward is None
    assert answer.done and answer.reward == 1.0 and answer.metrics == {"correct": 1.0}


def test_wrong_or_missing_answers_earn_nothing():
    (wrong,) = play_turns(Calculator(), "1777")
    (none,) = play_turns(Calculator(), "no idea")
    assert (wrong.reward, wrong.done, none.reward, none.done) == (0.0, True, 0.0, True)


def test_malformed_and_failing_calls_are_reported_to_the_model():
    malformed, failing = play_turns(
        Calculator(), "<tool_call>{calculate}</tool_call>", CALL.format("calculate", {"expression": "1/0"})
    )
    assert malformed.observation[0]["content"].startswith("error: the tool call is not valid JSON")
    assert failing.observation[0]["content"] == "error: ValueError: division by zero"
    assert not malformed.done and not failing.done


def test_tool_call_reward_shapes_each_well_formed_call():
    (call,) = play_turns(Calculator(tool_call_reward=0.2), CALL.format("calculate", {"expression": "1+1"}) * 2)
    assert call.reward == pytest.approx(0.4)
