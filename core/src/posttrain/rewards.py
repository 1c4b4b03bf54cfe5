"""Reward functions: how core resolves, configures, calls and validates them (one place, for every method).

A reward function scores a batch of completions::

    def my_reward(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` have one entry per completion (a prompt repeats for each of its samples);
``columns`` holds the dataset's other columns, one value per completion; a function that declares
``completion_ids`` (or takes ``**columns``) also receives the completions' token ids. It returns one
number per completion, or ``None`` where it does not apply: that function then carries no weight for that
completion, and a completion no function scores is "unscored" (NaN in the tensors below).

Parameters are typed: decorate a function with :func:`reward` and an options dataclass, and a run's
``reward_kwargs: {name: {field: value}}`` fills it (checked like any config: unknown keys get a "did you
mean", wrong types name the field), is saved with the run's config, and reaches the function as the
keyword argument ``options``::

    @dataclass
    class FormatOptions:
        pattern: str = r"<answer>.*</answer>"  # regex the whole completion must match

    @reward(options=FormatOptions)
    def format_reward(prompts, completions, *, options, **columns):
        ...

Rewards come from ``posttrain.rewards`` entry points (``accuracy = pkg:accuracy``), from
``posttrain_register_rewards`` hooks, or from callables passed to :func:`posttrain.train` (``rewards=``).

**Pairwise judges** (``@judge``, :class:`Judge`) ship the same way and say which of two completions is
better (online DPO ranks its pairs with one); they are defined in ``posttrain._judges`` and public here.

.. versionadded:: 1.0
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from posttrain._errors import ConfigError, PosttrainError
from posttrain._judges import Judge, JudgeError, PairwiseJudge, is_judge, judge  # public here

__all__ = [
    "Judge",
    "JudgeError",
    "PairwiseJudge",
    "RewardError",
    "RewardFunction",
    "RewardSet",
    "is_judge",
    "judge",
    "reward",
    "reward_config_problems",
]

_OPTIONS_ATTR = "__posttrain_reward_options__"


class RewardFunction(Protocol):
    """``func(prompts, completions, **columns) -> list[float | None]``, one value per completion.

    .. versionadded:: 1.0
    """

    def __call__(self, prompts: list, completions: list, **columns: Any) -> Sequence[float | None]: ...


class RewardError(PosttrainError):
    """A reward function failed or returned something unusable; names the function, the dataset row, the
    completion, the step and where in the function it failed.

    .. versionadded:: 1.0
    """


def reward(options: type | None = None) -> Callable[[Callable], Callable]:
    """Declare a reward function's typed options (a dataclass filled from ``reward_kwargs[name]``).

    Args:
        options: a dataclass whose fields all have defaults; its instance is passed as ``options=``.

    .. versionadded:: 1.0
    """
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"reward(options=...) needs a dataclass, got {options!r}")

    def mark(func: Callable) -> Callable:
        setattr(func, _OPTIONS_ATTR, options)
        return func

    return mark


def options_class(func: Callable) -> type | None:
    """The options dataclass declared with :func:`reward`, or None."""
    return getattr(func, _OPTIONS_ATTR, None)


def _build_options(name: str, func: Callable, values: dict | None) -> Any:
    cls = options_class(func)
    if cls is None:
        if values:
            raise ConfigError(
                f"reward_kwargs gives options for reward {name!r} ({', '.join(sorted(values))}), but that reward "
                "declares none; remove them, or check the reward's documentation for how it is configured"
            )
        return None
    from posttrain.config import build_options

    return build_options(cls, dict(values or {}), source=f"reward_kwargs.{name}")


def _accepts(func: Any, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def reward_config_problems(reward_funcs: Sequence[str], reward_weights: Sequence[float] | None) -> list[str]:
    """What is wrong with a run's ``reward_funcs`` and ``reward_weights``, one message per problem (empty: fine).

    Online methods call it from their config's ``problems()``, so a bad reward list is reported with every other
    config problem before a model loads; :meth:`RewardSet.resolve` calls it again on the names it resolves.

    Args:
        reward_funcs: the reward names, in order. Empty means "every reward given to ``posttrain.train``",
            whose count is only known when they are resolved, so the weights are not counted then.
        reward_weights: one weight per name, in the same order; None weights each 1.0.

    Returns:
        A list of messages naming the field and the fix: ``reward_weights`` of another length than
        ``reward_funcs``, and a name listed twice (its weight belongs in ``reward_weights``).

    .. versionadded:: 1.0
    """
    found = []
    if reward_weights is not None and reward_funcs and len(reward_weights) != len(reward_funcs):
        found += _weight_count_problem(reward_funcs, reward_weights)
    repeated = {name: n for name, n in Counter(reward_funcs).items() if n > 1}
    if repeated:
        times = ", ".join(f"{name!r} {'twice' if n == 2 else f'{n} times'}" for name, n in repeated.items())
        found.append(
            f"reward_funcs names {times} ({', '.join(reward_funcs)}); list each reward function once and give it "
            "a larger weight in reward_weights instead"
        )
    return found


def _weight_count_problem(names: Sequence[str], weights: Sequence[float]) -> list[str]:
    s = "" if len(names) == 1 else "s"
    return [
        f"reward_weights has {len(weights)} value{'' if len(weights) == 1 else 's'} for {len(names)} reward "
        f"function{s} ({', '.join(names) or 'none'}); give one weight per reward_funcs entry, in the same order, "
        "or leave reward_weights unset to weight each 1.0"
    ]


class RewardSet:
    """The reward functions of a run, resolved and configured once: names, callables, weights.

    .. versionadded:: 1.0
    """

    def __init__(self, names: list[str], funcs: list[Callable], weights: Sequence[float] | None = None):
        problems = reward_config_problems(names, weights)
        if not names and weights:  # the names are final here: weights for none is an error too
            problems += _weight_count_problem(names, weights)
        if problems:
            raise ConfigError("; ".join(problems))
        self.names = list(names)
        self.funcs = list(funcs)
        weights = [1.0] * len(names) if weights is None else list(weights)
        self.weights = torch.tensor(weights, dtype=torch.float32)

    @classmethod
    def resolve(
        cls,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        kwargs: dict[str, dict] | None = None,
        *,
        given: dict[str, Callable] | None = None,
        ctx: Any = None,
        method: str = "this method",
    ) -> RewardSet:
        """Resolve reward names: callables ``given`` to the run first, then hooks and entry points.

        Args:
            names: ``config.reward_funcs``; empty means "every callable in ``given``".
            weights: one per name (``config.reward_weights``); None gives 1.0 each.
            kwargs: ``config.reward_kwargs``, options by reward name.
            ctx: the run's context; resolved functions are recorded in ``ctx.rewards`` (for provenance).

        With an ``environment`` in ``ctx.config``, the episode return comes first, named after the environment
        and weighted by ``environment_reward_weight``; it may then be the only reward.

        Raises:
            ConfigError: no reward at all, options for an unknown reward, bad options, wrong weights.
            PluginError: a name no installed package or hook provides (with the install hint).
        """
        given = dict(given if given is not None else (ctx.rewards if ctx is not None else {}))
        names = list(names) or [n for n, f in given.items() if not is_judge(f)]
        problems = reward_config_problems(names, weights)  # before any plugin is imported
        if problems:
            raise ConfigError("; ".join(problems))
        environment = getattr(getattr(ctx, "config", None), "environment", None)
        if not names and environment:  # the environment's episode return is the reward
            return cls._with_environment(ctx.config, [], [], [])
        if not names:
            raise ConfigError(
                f"{method} needs at least one reward function: set reward_funcs (for example `--reward_funcs "
                "accuracy` with posttrain-rewards installed) or pass rewards={name: func} to posttrain.train"
            )
        unknown_options = sorted(set(kwargs or {}) - set(names))
        if unknown_options:
            raise ConfigError(
                f"reward_kwargs names {', '.join(map(repr, unknown_options))}, which reward_funcs does not list "
                f"({', '.join(names)}); fix the name or add it to reward_funcs"
            )
        missing = [n for n in names if n not in given]
        if missing:
            from posttrain._registry import resolve_rewards

            given.update(resolve_rewards(missing))
        judges = [n for n in names if is_judge(given[n])]
        if judges:
            raise ConfigError(
                f"reward_funcs names {', '.join(map(repr, judges))}, a pairwise judge: it compares two completions "
                "and cannot score one; remove it from reward_funcs and pass it as `judge` to a method that ranks "
                "pairs (online-dpo)"
            )
        funcs = []
        for name in names:
            func, options = given[name], _build_options(name, given[name], (kwargs or {}).get(name))
            funcs.append(functools.partial(func, options=options) if options is not None else func)
        if ctx is not None:
            ctx.rewards.update({n: given[n] for n in names})
        if environment:
            return cls._with_environment(ctx.config, names, funcs, weights)
        return cls(names, funcs, weights)

    @classmethod
    def _with_environment(cls, config: Any, names: list[str], funcs: list[Callable], weights: Any) -> RewardSet:
        """The run's rewards with the environment's episode return first, named after the environment."""
        from posttrain.environments import episode_return

        label = config.environment.split(":")[-1]
        if label in names:
            raise ConfigError(
                f"reward_funcs names {label!r}, which is also the name of the run's environment, whose episode "
                "return joins the rewards under that name; rename the reward function (or register it under "
                "another name)"
            )
        weights = cls(names, funcs, weights).weights.tolist()  # one weight per named reward, checked as usual
        return cls([label, *names], [episode_return, *funcs], [config.environment_reward_weight, *weights])

    def score(
        self,
        prompts: list,
        completions: list,
        columns: dict[str, list] | None = None,
        completion_ids: list[list[int]] | None = None,
        row_index: Sequence[int] | None = None,
        group_size: int = 1,
        step: int = 0,
    ) -> torch.Tensor:
        """Call every function once on the whole batch.

        Args:
            prompts: N entries (each prompt repeated ``group_size`` times).
            completions: N entries, the completion of each prompt entry.
            columns: dataset columns, N values each; completion_ids: N token lists.
            row_index: the dataset row of each *prompt* (N / group_size), to name a failing one.
            step: the optimizer step being computed, counted from 1 (as the progress bar shows it).

        Returns:
            (N, K) float32, NaN where a function returned None.

        Raises:
            RewardError: a function raised, returned the wrong number of values, or a non-number.
        """
        n = len(completions)
        columns = columns or {}
        row_index = list(row_index) if row_index is not None else list(range(math.ceil(n / group_size)))
        out = torch.full((n, len(self.funcs)), float("nan"))
        for k, (name, func) in enumerate(zip(self.names, self.funcs)):
            extra = (
                {"completion_ids": completion_ids}
                if completion_ids is not None and _accepts(func, "completion_ids")
                else {}
            )

            def call(sl: slice, _func: Callable = func, _extra: dict = extra) -> Any:
                kw = {c: v[sl] for c, v in columns.items()}
                kw.update({key: v[sl] for key, v in _extra.items()})
                return _func(prompts=prompts[sl], completions=completions[sl], **kw)

            try:
                values = list(call(slice(None)))
            except Exception as exc:
                _raise_for_failing_completion(name, call, n, row_index, group_size, step, exc)
            if len(values) != n:
                raise RewardError(
                    f"reward function {name!r} returned {len(values)} values for {n} completions at step {step}; "
                    "it must return one float (or None) per completion"
                )
            for j, value in enumerate(values):
                if value is None:
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = None
                if number is None or math.isnan(number) or math.isinf(number):
                    p, g = divmod(j, group_size)
                    raise RewardError(
                        f"reward function {name!r} returned {value!r} for completion {g} of dataset row "
                        f"{row_index[p]} at step {step}; rewards must be finite numbers (or None for 'not "
                        "applicable')"
                    )
                out[j, k] = number
        return out

    def combine(self, per_func: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k·R_k ignoring None (NaN); NaN where no function scored the completion. (N,)."""
        rewards = (per_func * self.weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        return rewards.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))

    def metrics(self, per_func: torch.Tensor, combined: torch.Tensor) -> dict[str, float]:
        """TRL's reward metrics for one batch: per-function mean/std, and the combined reward's mean/std."""
        out = {}
        for k, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = _nanmean(per_func[:, k])
            out[f"rewards/{name}/std"] = _nanstd(per_func[:, k])
        out["reward"] = _nanmean(combined)
        out["reward_std"] = _nanstd(combined)
        return {k: v for k, v in out.items() if not math.isnan(v)}


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x)) if (~torch.isnan(x)).any() else float("nan")


def _nanstd(x: torch.Tensor) -> float:
    values = x[~torch.isnan(x)]
    return float(values.std()) if len(values) > 1 else float("nan")


def _where(exc: BaseException) -> str:
    """'file.py:12 in func' of the innermost frame of the exception (the reward's own code, usually)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno} in {last.name})"


def _raise_for_failing_completion(name, call, n, row_index, group_size, step, exc) -> None:
    """Re-run the function one completion at a time to name the one that fails."""
    for j in range(n):
        try:
            call(slice(j, j + 1))
        except Exception as single:
            p, g = divmod(j, group_size)
            raise RewardError(
                f"reward function {name!r} raised on completion {g} of dataset row {row_index[p]} at step {step}: "
                f"{type(single).__name__}: {single}{_where(single)}. Fix the function or the row."
            ) from single
    raise RewardError(
        f"reward function {name!r} raised on the batch of {n} completions at step {step} (no single completion "
        f"reproduces it): {type(exc).__name__}: {exc}{_where(exc)}"
    ) from exc
