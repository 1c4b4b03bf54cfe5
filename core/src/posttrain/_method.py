"""The plugin contract in types: the Method protocol, its context, its outputs, metrics and callbacks.

A method is any class with the members below; it inherits from nothing in core. The loop instantiates
it with no arguments, then calls, in order::

    method.setup(ctx)                         # optional: reference model
    rows = method.prepare(dataset, ctx)       # validate + tokenize, once, before training (or the cache's rows)
    method.precompute(rows, ctx)              # optional: per-run values a model computes, never cached
    batch = method.collate(rows, ctx)         # per micro-batch
    batches = method.rollout(model, batches, ctx)  # optional, online methods: generate + score, every
                                              # micro-batch of the optimizer step at once
    out = method.loss(model, batch, ctx)      # -> LossOutput

**The normalisation contract.** ``loss`` returns the *sum* of its per-item losses and the number of
items it is normalised by (tokens for a token-level loss, pairs for a pairwise loss). The loop
back-propagates the sums of every micro-batch of an optimizer step on every process, then divides
the gradient by the total item count of the whole step. A method therefore never divides by
``gradient_accumulation_steps`` or the world size, and batch 8 x accumulation 1 equals batch 1 x
accumulation 8 by construction.

**Optional members** are listed in :data:`OPTIONAL_MEMBERS` with their signatures. The loop looks them
up once, by exact name, and :func:`method_problems` reports a near miss (``rolout``, ``check_row``) or a
wrong signature before training starts, so a typo never silently does nothing.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - annotations only; importing these costs seconds
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from posttrain.config import TrainingConfig

ConfigT = TypeVar("ConfigT", bound="TrainingConfig")

MetricKind = Literal["mean", "ratio", "sum", "total", "max", "min", "last"]


@dataclass(frozen=True)
class Metric:
    """A metric value with the rule the loop uses to reduce it over a logging window and over processes.

    A plain number (or 0-dim tensor) in :attr:`LossOutput.metrics` means :meth:`mean`. Use the
    constructors; each says what is logged at the end of a window of micro-batches on every process:

    - ``Metric.mean(v)``: the mean of the reported values (one per micro-batch and process).
    - ``Metric.ratio(numerator, denominator)``: sum of numerators / sum of denominators, e.g. correct
      tokens over tokens, exact however the items fall into micro-batches.
    - ``Metric.sum(v)``: the sum over the window (e.g. tokens trained on since the last log).
    - ``Metric.total(v)``: the running sum over the whole run (saved in checkpoints, so it survives
      resume), e.g. TRL's ``num_tokens``.
    - ``Metric.max(v)`` / ``Metric.min(v)``: extremes over the window and processes.
    - ``Metric.last(v)``: the value of the window's last micro-batch, averaged over processes.

    .. versionadded:: 1.0
    """

    kind: MetricKind
    value: Any
    denominator: Any = None

    @classmethod
    def mean(cls, value: Any) -> Metric:
        return cls("mean", value)

    @classmethod
    def ratio(cls, numerator: Any, denominator: Any) -> Metric:
        return cls("ratio", numerator, denominator)

    @classmethod
    def sum(cls, value: Any) -> Metric:
        return cls("sum", value)

    @classmethod
    def total(cls, value: Any) -> Metric:
        return cls("total", value)

    @classmethod
    def max(cls, value: Any) -> Metric:
        return cls("max", value)

    @classmethod
    def min(cls, value: Any) -> Metric:
        return cls("min", value)

    @classmethod
    def last(cls, value: Any) -> Metric:
        return cls("last", value)


@dataclass
class LossOutput:
    """What :meth:`Method.loss` returns for one micro-batch.

    Attributes:
        loss_sum: scalar tensor, the sum of the per-item losses of this micro-batch (with grad).
        n_items: how many items ``loss_sum`` sums over (int or 0-dim tensor); the loop divides by
            the total over the optimizer step, all micro-batches and processes included.
        metrics: name -> float, 0-dim tensor or :class:`Metric`. Plain values are averaged over
            micro-batches and processes; a :class:`Metric` says how else to reduce. Use TRL's names
            (``rewards/margins``, ``logps/chosen``, ...).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 metrics may be :class:`Metric` values.
    """

    loss_sum: torch.Tensor
    n_items: int | float | torch.Tensor
    metrics: dict[str, float | torch.Tensor | Metric] = field(default_factory=dict)


@dataclass
class TrainContext(Generic[ConfigT]):
    """Everything a method may need from the run, passed to every protocol call.

    ``model`` is the unwrapped policy model (use it for ``generate``); inside ``loss`` call the
    ``model`` argument, which may be wrapped for distributed training. Annotate with the method's
    config class for typed access: ``ctx: TrainContext[DPOConfig]``. For a vision-language model
    ``processor`` holds its processor (see :mod:`posttrain.vision`) and ``tokenizer`` the processor's tokenizer.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 ``processor``.
    """

    config: ConfigT
    tokenizer: PreTrainedTokenizerBase | None = None
    accelerator: Accelerator | None = None
    model: torch.nn.Module | None = None
    model_path: str | None = None
    step: int = 0  # optimizer steps completed so far
    micro_step: int = 0  # index of the micro-batch inside the current step
    training: bool = True  # False during evaluation
    rewards: dict[str, Any] = field(default_factory=dict)  # reward functions the run was given, by name
    state: dict[str, Any] = field(default_factory=dict)  # free space for a method's own objects
    # a vision-language model's processor (``tokenizer`` is its tokenizer); None for a text model
    processor: Any = None
    services: dict[str, RunService] = field(default_factory=dict)  # core services the loop keeps in step
    _upcoming: Callable[[int], list[UpcomingBatch]] | None = field(default=None, repr=False, compare=False)

    def upcoming_batches(self, horizon: int) -> list[UpcomingBatch]:
        """The micro-batches this process will roll out in the next ``horizon`` optimizer steps.

        The loop's data order is a pure function of (seed, step), so the batches of future steps are known
        now: a generation service uses this to sample them ahead of time instead of copying the loop's
        sampler. One entry per step in ``[step, step + horizon)`` that rolls out (with ``batch_reuse`` R,
        every R-th step), before the run's last step; each holds the collated micro-batches on the CPU,
        exactly as ``method.collate`` returns them and in the order ``rollout`` will receive them.

        Raises:
            RuntimeError: outside a training run (no loop set the data source).

        .. versionadded:: 1.0
        """
        if self._upcoming is None:
            raise RuntimeError(
                "TrainContext.upcoming_batches is only available inside posttrain.loop.train, which knows the "
                "data order; this context was built elsewhere"
            )
        return self._upcoming(horizon)

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        import torch

        return torch.device("cpu")

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0


class UpcomingBatch(NamedTuple):
    """The micro-batches one future optimizer step rolls out (see :meth:`TrainContext.upcoming_batches`).

    .. versionadded:: 1.0
    """

    step: int  # the optimizer step (steps completed before it) whose rollout receives these batches
    batches: list[dict]  # collated micro-batches, on the CPU


class RunService(Protocol):
    """Infrastructure that lives beside the loop for one run and must follow its steps, checkpoints and end,
    such as the asynchronous generation worker. Core registers one in ``ctx.services[name]``; the loop calls:

    - ``on_step(ctx)``: the policy is ready for step ``ctx.step``: once before the first step of a run (new
      or resumed), then after every optimizer step, before logging, evaluation and checkpointing.
    - ``state_dict()`` when a checkpoint is written, on every process (tensors, numbers, strings, lists and
      dicts only: checkpoints load with ``weights_only``); ``load_state_dict(state)`` on resume, before the
      first ``on_step``.
    - ``close()`` when training ends, however it ends (finished, interrupted, failed).

    .. versionadded:: 1.0
    """

    def on_step(self, ctx: TrainContext) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Method(Protocol):
    """A training method. See the module docstring for the call order and the loss contract.

    Optional members (declared in :data:`OPTIONAL_MEMBERS`, checked by :func:`method_problems`):

    - ``setup(ctx)``: once, after the model loads and before data is prepared.
    - ``check_rows(rows) -> list[RowProblem]``: method-specific row problems, for ``posttrain
      check-data`` (no model, no tokenizer) and for ``prepare`` to raise as :class:`DataError`.
    - ``rollout(model, batches, ctx) -> batches``: online methods generate and score here (no grad). It
      receives every micro-batch of this process's optimizer step at once, so a generator can sample them
      in one call, and returns the rolled-out micro-batches in the same order.
    - ``load_model(config) -> model``: a model class other than a causal LM (a reward model).
    - ``state_dict() -> dict`` / ``load_state_dict(state)``: method state saved in checkpoints
      (tensors, numbers, strings, lists and dicts only: checkpoints load with ``weights_only``).
    - ``batch_reuse(config) -> int``: train on each rolled-out batch for this many consecutive
      optimizer steps (GRPO's μ); the data advances once per group, so no row is skipped.
    - ``rows_per_batch(config, batch_size) -> int``: dataset rows in a micro-batch of ``batch_size`` items
      when a row expands into several (prompts into completions); default ``batch_size``.
    - ``precompute(rows, ctx) -> None``: after ``prepare`` (or the prepared-data cache), on every run: values a
      model computes for this run (reference log-probs) written into the rows in place. Never cached.

    Optional attributes (:data:`OPTIONAL_ATTRIBUTES`):

    - ``supports_images: bool``: the method trains on rows with images (``images``/``image`` columns) for a
      vision-language model; ``posttrain info`` shows it and the conformance kit adds its image checks.
      Without it, rows with images are refused before a model loads.
    - ``supports_padding_free: bool``: the method's config has a ``padding_free`` field (true, false or "auto";
      :func:`posttrain.models.resolve_padding_free`) and its loss runs a micro-batch as one padding-free row when
      it is on; the conformance kit adds its padding-free checks.
    - ``prepare_cacheable: bool``: ``prepare`` depends only on the rows, the tokenizer/processor, the config and
      the method package's code (not on ``ctx.model``), so the loop may reuse its rows from the prepared-data
      cache (docs: datasets); put model-computed values in ``precompute``.

    Example::

        class MyMethod:
            name = "my-method"
            config_class = MyConfig
            dataset_formats = ("language_modeling",)
            def prepare(self, dataset, ctx): ...
            def collate(self, rows, ctx): ...
            def loss(self, model, batch, ctx): return LossOutput(loss_sum, n_items, {})

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 optional members are declared and checked; ``batch_reuse`` and
       ``rows_per_batch`` added; ``check_rows`` returns :class:`RowProblem` values.
    .. versionchanged:: 1.0 optional attribute ``supports_images``.
    .. versionchanged:: 1.0 optional attribute ``supports_padding_free``.
    .. versionchanged:: 1.1 optional member ``precompute`` and attribute ``prepare_cacheable``.
    """

    name: str
    config_class: type[TrainingConfig]
    dataset_formats: tuple[str, ...]

    def prepare(self, dataset: Any, ctx: TrainContext) -> Sequence[dict]: ...

    def collate(self, rows: list[dict], ctx: TrainContext) -> dict: ...

    def loss(self, model: Any, batch: dict, ctx: TrainContext) -> LossOutput: ...


#: Required callables of a method and their positional parameters (after ``self``).
REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {
    "prepare": ("dataset", "ctx"),
    "collate": ("rows", "ctx"),
    "loss": ("model", "batch", "ctx"),
}
#: Optional callables the loop and the CLI use when a method defines them, with their parameters.
OPTIONAL_MEMBERS: dict[str, tuple[str, ...]] = {
    "setup": ("ctx",),
    "check_rows": ("rows",),
    "rollout": ("model", "batches", "ctx"),
    "load_model": ("config",),
    "state_dict": (),
    "load_state_dict": ("state",),
    "batch_reuse": ("config",),
    "rows_per_batch": ("config", "batch_size"),
    "precompute": ("rows", "ctx"),
}
REQUIRED_ATTRIBUTES = ("name", "config_class", "dataset_formats")
#: Optional attributes and their types (checked by :func:`method_problems` when present).
OPTIONAL_ATTRIBUTES: dict[str, type] = {
    "supports_images": bool,
    "supports_padding_free": bool,
    "prepare_cacheable": bool,
}


def _positional_arity(func: Any) -> tuple[int, int] | None:
    """(required, maximum) positional arguments of a bound method or function; None if unknowable."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return (0, 10**6)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is inspect.Parameter.empty)
    return required, len(positional)


def _signature_problem(owner: str, name: str, func: Any, expected: tuple[str, ...]) -> str | None:
    if not callable(func):
        return f"{owner}.{name} must be a method taking ({', '.join(expected)}), got {type(func).__name__}"
    arity = _positional_arity(func)
    if arity is None:
        return None
    required, maximum = arity
    if required > len(expected) or maximum < len(expected):
        try:
            shown = str(inspect.signature(func))
        except (TypeError, ValueError):
            shown = "(...)"
        return (
            f"{owner}.{name}{shown} does not match the protocol: the loop calls {name}({', '.join(expected)}) "
            f"with {len(expected)} argument(s)"
        )
    return None


def method_problems(method: Any) -> list[str]:
    """Everything wrong with a method (class or instance) against the protocol, as readable sentences.

    Checks required attributes, the arity of every required and optional member, and public names that
    are near misses of an optional member (``rolout``), which the loop would silently never call.
    """
    cls = method if isinstance(method, type) else type(method)
    owner = f"{cls.__module__}.{cls.__qualname__}"
    instance = method if not isinstance(method, type) else None
    problems = [
        f"{owner} lacks {attr!r}, required by the Method protocol"
        for attr in REQUIRED_ATTRIBUTES
        if not hasattr(cls, attr)
    ]
    present = set(dir(cls)) | (set(vars(instance)) if instance is not None and hasattr(instance, "__dict__") else set())
    for name, expected in {**REQUIRED_MEMBERS, **OPTIONAL_MEMBERS}.items():
        if name not in present:  # members set on the instance count: the loop looks them up there
            if name in REQUIRED_MEMBERS:
                problems.append(f"{owner} lacks {name}({', '.join(expected)}), required by the Method protocol")
            continue
        problem = _signature_problem(owner, name, _bound(cls, instance, name), expected)
        if problem:
            problems.append(problem)
    for name, kind in OPTIONAL_ATTRIBUTES.items():
        value = getattr(instance if instance is not None else cls, name, None)
        if value is not None and not isinstance(value, kind):
            problems.append(f"{owner}.{name} must be a {kind.__name__}, got {type(value).__name__} {value!r}")
    known = set(REQUIRED_MEMBERS) | set(OPTIONAL_MEMBERS) | set(REQUIRED_ATTRIBUTES) | set(OPTIONAL_ATTRIBUTES)
    own = set(vars(cls)) | (set(vars(instance)) if instance is not None and hasattr(instance, "__dict__") else set())
    candidates = sorted(set(OPTIONAL_MEMBERS) | set(REQUIRED_MEMBERS) | set(OPTIONAL_ATTRIBUTES))
    for attr in sorted(own):
        if attr.startswith("_") or attr in known:
            continue
        close = difflib.get_close_matches(attr, candidates, n=1, cutoff=0.8)
        if close:
            problems.append(
                f"{owner} defines {attr!r}, which is not part of the Method protocol and is never called; "
                f"did you mean {close[0]!r}? (rename it, or make it private with a leading underscore)"
            )
    return problems


def _bound(cls: type, instance: Any, name: str) -> Any:
    """``name`` as the loop would call it: bound to an instance (``self`` dropped from the signature)."""
    if instance is not None:
        return getattr(instance, name)
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return raw.__func__
    if isinstance(raw, classmethod) or not inspect.isfunction(raw):
        return getattr(cls, name)
    import functools

    return functools.partial(raw, None)  # a plain function: bind a placeholder for `self`


def optional_member(method: Any, name: str) -> Any:
    """The bound optional member ``name`` of ``method``, or None; the one place the loop looks them up."""
    if name not in OPTIONAL_MEMBERS:
        raise KeyError(f"{name!r} is not an optional member of the Method protocol")
    return getattr(method, name, None)


# -- callbacks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOutcome:
    """How a run ended, handed to ``Callback.on_train_end``.

    Attributes:
        status: ``"finished"`` (all steps done, model saved), ``"interrupted"`` (Ctrl-C or SIGTERM; a
            resumable checkpoint was written when ``save_on_interrupt``) or ``"failed"`` (an exception).
        global_step: optimizer steps completed.
        output_dir: the run's directory.
        error: the exception of a failed run, else None.

    .. versionadded:: 1.0
    """

    status: Literal["finished", "interrupted", "failed"]
    global_step: int
    output_dir: Path
    error: BaseException | None = None


class Callback(Protocol):
    """Training-event callbacks added through ``posttrain_add_callbacks``. Every member is optional.

    Callbacks run on the main process only. ``on_log`` and ``on_evaluate`` receive the logged row
    (``step`` plus metric names; evaluation keys are ``eval_``-prefixed). A callback that raises is
    reported once and disabled; training continues (a logger must never kill a run).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 ``on_train_end`` receives a :class:`TrainOutcome` and is called for
       failed and interrupted runs too; a failing callback no longer stops training.
    """

    def on_train_begin(self, ctx: TrainContext) -> None: ...

    def on_log(self, ctx: TrainContext, metrics: dict[str, Any]) -> None: ...

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, Any]) -> None: ...

    def on_save(self, ctx: TrainContext, checkpoint_dir: Path) -> None: ...

    def on_train_end(self, ctx: TrainContext, outcome: TrainOutcome) -> None: ...


CALLBACK_EVENTS: dict[str, tuple[str, ...]] = {
    "on_train_begin": ("ctx",),
    "on_log": ("ctx", "metrics"),
    "on_evaluate": ("ctx", "metrics"),
    "on_save": ("ctx", "checkpoint_dir"),
    "on_train_end": ("ctx", "outcome"),
}


def callback_problems(callback: Any) -> list[str]:
    """Near-miss event names (``on_logs``) and wrong signatures of a callback object."""
    cls = type(callback)
    owner = f"{cls.__module__}.{cls.__qualname__}"
    problems = []
    for name, expected in CALLBACK_EVENTS.items():
        handler = getattr(callback, name, None)
        if handler is None:
            continue
        if name == "on_train_end":  # the 0.1 form on_train_end(ctx) is still accepted
            arity = _positional_arity(handler)
            if arity is not None and arity[0] <= 1 <= arity[1]:
                continue
        problem = _signature_problem(owner, name, handler, expected)
        if problem:
            problems.append(problem)
    public = [a for a in dir(callback) if a.startswith("on_") and a not in CALLBACK_EVENTS]
    for attr in public:
        close = difflib.get_close_matches(attr, list(CALLBACK_EVENTS), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the events are {', '.join(CALLBACK_EVENTS)}"
        problems.append(f"{owner} defines {attr!r}, which is not a callback event and is never called{hint}")
    return problems
