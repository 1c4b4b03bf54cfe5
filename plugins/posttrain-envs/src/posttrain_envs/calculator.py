"""The calculator environment: arithmetic the model cannot do reliably in its head, with a tool that can.

An episode: the row's question (``"What is 37*48?"``), the model calls ``calculate`` as often as it likes
(each result comes back as a tool message), then answers without a tool call; that answer ends the episode
and earns 1.0 when its last number equals the row's ``answer``, else 0.0. Malformed calls are answered with
an error the model can read, never run. ``tool_call_reward`` optionally pays a small amount for each
well-formed call, as per-turn shaping.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Any

from posttrain.environments import Step, Turn, run_tools

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
MAX_EXPONENT = 64  # 2**64 is fine; 9**9**9 would take the process down
MAX_LENGTH = 200  # characters of an expression


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression: numbers, ``+ - * / // % **`` and parentheses.

    Parsed with :mod:`ast` and evaluated node by node (never ``eval``), in exact fractions.

    Raises:
        ValueError: anything else (names, calls, a huge exponent, division by zero), with the reason.
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression ({exc.msg})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))  # "0.1" as written (1/10), not the binary float nearest to it
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > MAX_EXPONENT):
            raise ValueError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return Fraction(_OPERATORS[type(node.op)](left, right))
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


def show(value: Fraction) -> str:
    """An exact value as the model should copy it: an integer, or a decimal rounded to 6 places."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "37*48".
    """
    return show(evaluate(expression))


def final_number(text: str) -> str | None:
    """The last number written in ``text``, or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


class Calculator:
    """Arithmetic with a ``calculate`` tool; rows hold ``prompt`` and the exact ``answer``.

    The episode ends when the model answers without a tool call: reward 1.0 when the answer's last number equals
    ``answer``, else 0.0. Tool calls (and malformed ones) are answered with tool messages.

    Args:
        tool_call_reward: paid for each well-formed call, as per-turn shaping (default 0.0: outcome only).
    """

    tools = [calculate]

    def __init__(self, tool_call_reward: float = 0.0):
        self.tool_call_reward = tool_call_reward
        self.answer = ""

    def reset(self, row: dict[str, Any], seed: int) -> None:
        self.answer = str(row["answer"]).strip()
        return None  # the row's prompt opens the episode

    def step(self, turn: Turn) -> Step:
        if turn.tool_calls or turn.malformed:
            shaping = self.tool_call_reward * len(turn.tool_calls)
            return Step(observation=run_tools(turn, self.tools), reward=shaping or None)
        got = final_number(turn.content)
        correct = got is not None and _same(got, self.answer)
        return Step(reward=float(correct), done=True, metrics={"correct": float(correct)})


def _same(got: str, expected: str) -> bool:
    try:
        return Fraction(got) == Fraction(expected)
    except (ValueError, ZeroDivisionError):
        return got == expected
