"""Completion text and number parsing shared by the verifiers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the assistant contents of a message list (conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = [
            m.get("content", "")
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        return "".join(p if isinstance(p, str) else "" for p in parts)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def final_number(text: str) -> Decimal | None:
    """The last number of ``text`` (inside the last ``\\boxed{}`` when there is one), or None.

    ``1,234.50`` -> 1234.50; ``-3`` -> -3; GSM8K's ``#### 72`` -> 72.
    """
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form for exact-match comparison."""
    return " ".join(text.split()).casefold()
