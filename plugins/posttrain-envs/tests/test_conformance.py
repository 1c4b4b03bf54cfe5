"""The environment conformance kit on both environments, by their installed names, with scripted policies that
play them well."""

from __future__ import annotations

import re

from posttrain.environments import ToolCallParser
from posttrain.testing.environments import environment_suite

ARITHMETIC_ROWS = [
    {"prompt": [{"role": "user", "content": "37*48"}], "answer": "1776"},
    {"prompt": [{"role": "user", "content": "(12+5)*3"}], "answer": "51"},
    {"prompt": [{"role": "user", "content": "7/4"}], "answer": "1.75"},
]
GUESS_ROWS = [
    {"prompt": [{"role": "user", "content": "Guess my number between 1 and 100."}], "secret": 73},
    {"prompt": [{"role": "user", "content": "Guess my number between 1 and 100."}]},
]


def use_calculator(context: str) -> str:
    """Call ``calculate`` on the question, then answer with the tool's result."""
    result = re.search(r"<\|tool\|>([^<]*)<\|end\|>\s*<\|assistant\|>$", context)
    if result:
        return f"The answer is {result.group(1)}"
    question = re.findall(r"<\|user\|>([^<]*)<\|end\|>", context)[-1]
    return ToolCallParser().format("calculate", {"expression": question})


def bisect(context: str) -> str:
    """Binary search from the higher/lower feedback so far (range 1-100)."""
    low, high = 1, 100
    for guess, feedback in re.findall(r"<\|assistant\|>(\d+)<\|end\|>\s*<\|user\|>(higher|lower)", context):
        low, high = (int(guess) + 1, high) if feedback == "higher" else (low, int(guess) - 1)
    return str((low + high) // 2)


TestCalculator = environment_suite("calculator", rows=ARITHMETIC_ROWS, policy=use_calculator)
TestGuessNumber = environment_suite("guess-number", rows=GUESS_ROWS, policy=bisect, max_turns=8)
