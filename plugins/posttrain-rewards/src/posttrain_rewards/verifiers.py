"""Rule-based rewards: math accuracy, a regex format check and DAPO's soft overlong penalty.

Every reward takes ``(prompts, completions, **columns)`` and returns one float (or None: "not
applicable") per completion, batch-wise. Completions are strings, or ``[{"role": "assistant",
"content": ...}]`` lists for conversational prompts.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

from posttrain.rewards import reward

from posttrain_rewards._text import completion_text, final_number, normalise

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
FORMAT_PATTERN_ENV = "POSTTRAIN_FORMAT_PATTERN"
LENGTH_PENALTY_ENV = "POSTTRAIN_LENGTH_PENALTY"


def accuracy(
    prompts: list, completions: list, answer: list | None = None, solution: list | None = None, **columns: Any
) -> list[float | None]:
    """1.0 when the completion's final number equals the reference's, else 0.0.

    The reference comes from the ``answer`` column (or ``solution``); its final number is used too, so a
    GSM8K solution ending in ``#### 72`` works as is. A reference without a number is compared as text
    (case and whitespace ignored) with the whole completion. A missing (None/empty) reference gives None.

    Raises:
        ValueError: when the dataset has neither an ``answer`` nor a ``solution`` column.
    """
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError(
            "the 'accuracy' reward needs the reference answer in an 'answer' (or 'solution') dataset "
            f"column; the columns passed were: {sorted(columns) or 'none'}"
        )
    out: list[float | None] = []
    for completion, reference in zip(completions, references):
        if reference is None or str(reference).strip() == "":
            out.append(None)
            continue
        text, expected = completion_text(completion), final_number(str(reference))
        if expected is None:
            out.append(float(normalise(text) == normalise(str(reference))))
        else:
            got = final_number(text)
            out.append(float(got is not None and got == expected))
    return out


def make_format_reward(pattern: str = DEFAULT_FORMAT_PATTERN, flags: int = re.DOTALL):
    r"""A reward that is 1.0 when the whole completion (stripped) matches ``pattern``, else 0.0.

    Example::

        boxed = make_format_reward(r".*\\boxed\{.+\}.*")
        boxed([""], [r"so \boxed{4}"])  # [1.0]
    """
    compiled = re.compile(pattern, flags)

    def format_reward(prompts: list, completions: list, **columns: Any) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    format_reward.pattern = pattern
    return format_reward


def _deprecated_env(name: str, option: str) -> str | None:
    """An environment variable of 1.x that set a reward option; still read, with a warning, until 2.0."""
    value = os.environ.get(name)
    if value is not None:
        warnings.warn(
            f"{name} is deprecated and will be ignored from posttrain-rewards 2.0; set the option in the run's "
            f"config instead: reward_kwargs: {{{option}}} (it is then saved with the run).",
            FutureWarning,
            stacklevel=3,
        )
    return value


@dataclass
class FormatOptions:
    """Options of the ``format`` reward (``reward_kwargs: {format: {pattern: ...}}``)."""

    pattern: str = DEFAULT_FORMAT_PATTERN  # regex the whole (stripped) completion must match (re.DOTALL)


@reward(options=FormatOptions)
def format_reward(
    prompts: list,
    completions: list,
    format_pattern: list | None = None,
    *,
    options: FormatOptions | None = None,
    **columns: Any,
) -> list[float]:
    """The registered ``format`` reward: 1.0 when the completion matches the pattern, else 0.0. The pattern
    is, first found: the row's ``format_pattern`` column, ``reward_kwargs.format.pattern``, or
    ``<think>…</think> <answer>…</answer>``."""
    default = (options or FormatOptions()).pattern
    if options is None or options.pattern == DEFAULT_FORMAT_PATTERN:
        default = _deprecated_env(FORMAT_PATTERN_ENV, "format: {pattern: ...}") or default
    patterns = format_pattern or [None] * len(completions)
    out = []
    for completion, pattern in zip(completions, patterns):
        compiled = re.compile(pattern or default, re.DOTALL)
        out.append(float(compiled.fullmatch(completion_text(completion).strip()) is not None))
    return out


def make_length_penalty(max_completion_len: int = 512, soft_punish_cache: int = 128):
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13) for a length L:

        0 if L <= L_max − L_cache;  (L_max − L_cache − L) / L_cache if L <= L_max;  −1 beyond L_max

    L counts tokens (``completion_ids``, which GRPO and RLOO pass) or characters when called without them.
    """
    if max_completion_len < 1 or not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(
            f"need max_completion_len >= 1 and 0 <= soft_punish_cache <= max_completion_len, got "
            f"{max_completion_len} and {soft_punish_cache}"
        )
    free = max_completion_len - soft_punish_cache

    def length_penalty(
        prompts: list, completions: list, completion_ids: list | None = None, **columns: Any
    ) -> list[float]:
        lengths = (
            [len(ids) for ids in completion_ids]
            if completion_ids is not None
            else [len(completion_text(c)) for c in completions]
        )
        return [
            0.0 if n <= free else (free - n) / soft_punish_cache if n <= max_completion_len else -1.0 for n in lengths
        ]

    return length_penalty


@dataclass
class LengthPenaltyOptions:
    """Options of the ``length_penalty`` reward (``reward_kwargs: {length_penalty: {...}}``)."""

    max_completion_len: int = 512  # L_max: the completion budget (TRL's default max_completion_length)
    soft_punish_cache: int = 128  # L_cache: the zone before L_max where the penalty ramps from 0 to -1


@reward(options=LengthPenaltyOptions)
def length_penalty(
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    *,
    options: LengthPenaltyOptions | None = None,
    **columns: Any,
) -> list[float]:
    """The registered ``length_penalty``: :func:`make_length_penalty` with ``reward_kwargs.length_penalty``
    (default 512 and 128, TRL's default ``max_completion_length`` and a quarter of it)."""
    options = options or LengthPenaltyOptions()
    max_len, cache = options.max_completion_len, options.soft_punish_cache
    raw = _deprecated_env(LENGTH_PENALTY_ENV, "length_penalty: {max_completion_len: ..., soft_punish_cache: ...}")
    if raw is not None and options == LengthPenaltyOptions():
        try:
            max_len, cache = (int(v) for v in raw.split(","))
        except ValueError:
            raise ValueError(
                f"{LENGTH_PENALTY_ENV}={raw!r} is not understood; give two integers 'MAX,CACHE', e.g. '512,128' "
                "(better: reward_kwargs: {length_penalty: {max_completion_len: 512, soft_punish_cache: 128}})"
            ) from None
    return make_length_penalty(max_len, cache)(prompts, completions, completion_ids=completion_ids)
