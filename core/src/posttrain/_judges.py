"""Pairwise judges: how core resolves, configures, calls and validates them. Public through ``posttrain.rewards``.

A pairwise judge says which of two completions of the same prompt is better::

    @judge
    def shorter(prompts, completions, **columns) -> list[int | None]:
        return [0 if len(a) <= len(b) else 1 for a, b in completions]

``prompts`` has one entry per pair, ``completions`` one ``[first, second]`` pair per prompt (strings, or
``[{"role": "assistant", ...}]`` for conversational prompts), ``columns`` the dataset's other columns, one
value per pair; a judge that declares ``completion_ids`` (or takes ``**columns``) also receives the pairs'
token ids. It returns, per pair, ``0`` (the first is better), ``1`` (the second is better) or ``None``
(no preference: the pair carries no training signal). A judge that might favour a position (an LLM asked
"A or B?") should present each pair in both orders, or in a random one, itself.

Judges ship like reward functions, in the ``posttrain.rewards`` entry-point group (``pairrm = pkg:pairrm``)
or from ``posttrain_register_rewards`` hooks; :func:`judge` marks them, so a judge named where a reward
function is expected (or the other way round) is a configuration error, not a silent mis-call. Options
work as for rewards: ``@judge(options=Dataclass)``, filled from a run's ``judge_kwargs``.

.. versionadded:: 1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, final

from posttrain._errors import ConfigError, PosttrainError

__all__ = ["Judge", "JudgeError", "PairwiseJudge", "is_judge", "judge"]

_JUDGE_ATTR = "__posttrain_judge__"  # the options dataclass (or None) of a function marked by @judge


class PairwiseJudge(Protocol):
    """``func(prompts, completions, **columns) -> list[0 | 1 | None]``, one value per ``[first, second]`` pair.

    .. versionadded:: 1.0
    """

    def __call__(self, prompts: list, completions: list, **columns: Any) -> Sequence[int | None]: ...


class JudgeError(PosttrainError):
    """A judge failed or returned something other than 0, 1 or None; names the judge, the dataset row and the step.

    .. versionadded:: 1.0
    """


def judge(func: Callable | None = None, *, options: type | None = None) -> Any:
    """Mark a function as a pairwise judge, optionally with typed options (a dataclass filled from
    ``judge_kwargs``, passed as the keyword argument ``options``). Use as ``@judge`` or ``@judge(options=X)``.

    .. versionadded:: 1.0
    """
    import dataclasses

    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"judge(options=...) needs a dataclass, got {options!r}")

    def mark(f: Callable) -> Callable:
        setattr(f, _JUDGE_ATTR, options)
        return f

    return mark(func) if func is not None else mark


def is_judge(func: Any) -> bool:
    """Whether ``func`` was marked with :func:`judge`.

    .. versionadded:: 1.0
    """
    return hasattr(func, _JUDGE_ATTR)


@final
class Judge:
    """The pairwise judge of a run, resolved and configured once.

    .. versionadded:: 1.0
    """

    __module__ = "posttrain.rewards"

    def __init__(self, name: str, func: Callable):
        self.name = name
        self.func = func

    @classmethod
    def resolve(
        cls,
        name: str,
        kwargs: dict | None = None,
        *,
        given: dict[str, Callable] | None = None,
        ctx: Any = None,
        method: str = "this method",
    ) -> Judge:
        """Resolve a judge by name: callables ``given`` to the run first, then hooks and entry points.

        Args:
            kwargs: the judge's options (``config.judge_kwargs``), field -> value.
            ctx: the run's context; the judge is recorded in ``ctx.rewards`` (for provenance).

        Raises:
            ConfigError: the name is a reward function, not a judge; options it does not declare; bad options.
            PluginError: a name no installed package or hook provides (with the install hint).
        """
        import functools

        given = dict(given if given is not None else (ctx.rewards if ctx is not None else {}))
        if name not in given:
            from posttrain._registry import resolve_rewards

            given.update(resolve_rewards([name]))
        func = given[name]
        if not is_judge(func):
            raise ConfigError(
                f"{method}: {name!r} is a reward function, not a pairwise judge (judges are marked with "
                f"@posttrain.rewards.judge); rank with it through reward_funcs: [{name}], or name a judge"
            )
        options_class = getattr(func, _JUDGE_ATTR)
        if options_class is None and kwargs:
            raise ConfigError(
                f"judge_kwargs gives options for judge {name!r} ({', '.join(sorted(kwargs))}), but that judge "
                "declares none; remove them, or check the judge's documentation for how it is configured"
            )
        if options_class is not None:
            from posttrain.config import build_options

            func = functools.partial(func, options=build_options(options_class, dict(kwargs or {}), "judge_kwargs"))
        if ctx is not None:
            ctx.rewards[name] = given[name]
        return cls(name, func)

    def compare(
        self,
        prompts: list,
        completions: list,
        columns: dict[str, list] | None = None,
        completion_ids: list | None = None,
        row_index: Sequence[int] | None = None,
        step: int = 0,
    ) -> Any:
        """Judge every pair of a batch in one call.

        Args:
            prompts: P prompts; completions: P ``[first, second]`` pairs; columns: name -> P values;
            completion_ids: P pairs of token lists; row_index: the dataset row of each prompt (for errors);
            step: the optimizer step being computed, counted from 1.

        Returns:
            (P,) float32: 0.0 where the first completion is better, 1.0 where the second is, NaN where the
            judge has no preference.

        Raises:
            JudgeError: the judge raised, returned the wrong number of values, or a value other than 0, 1, None.
        """
        import torch

        from posttrain.rewards import _accepts, _where

        rows = list(row_index) if row_index is not None else list(range(len(prompts)))
        kwargs = dict(columns or {})
        if completion_ids is not None and _accepts(self.func, "completion_ids"):
            kwargs["completion_ids"] = completion_ids

        def call(sl: slice) -> list:
            return list(
                self.func(prompts=prompts[sl], completions=completions[sl], **{k: v[sl] for k, v in kwargs.items()})
            )

        try:
            values = call(slice(None))
        except Exception as exc:
            for i in range(len(prompts)):  # re-run pair by pair to name the one that fails
                try:
                    call(slice(i, i + 1))
                except Exception as single:
                    raise JudgeError(
                        f"judge {self.name!r} raised on the pair of dataset row {rows[i]} at step {step}: "
                        f"{type(single).__name__}: {single}{_where(single)}. Fix the judge or the row."
                    ) from single
            raise JudgeError(
                f"judge {self.name!r} raised on a batch of {len(prompts)} pairs at step {step} (no single pair "
                f"reproduces it): {type(exc).__name__}: {exc}{_where(exc)}"
            ) from exc
        if len(values) != len(prompts):
            raise JudgeError(
                f"judge {self.name!r} returned {len(values)} values for {len(prompts)} pairs at step {step}; it must "
                "return one value per pair: 0 (first better), 1 (second better) or None (no preference)"
            )
        out = torch.full((len(values),), math.nan)
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or value not in (0, 1):
                raise JudgeError(
                    f"judge {self.name!r} returned {value!r} for the pair of dataset row {rows[i]} at step {step}; "
                    "a judge returns 0 (first better), 1 (second better) or None (no preference)"
                )
            out[i] = float(value)
        return out
