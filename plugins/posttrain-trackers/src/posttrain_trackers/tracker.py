"""What the three trackers share: typed options read from ``tracker_options``, activation by ``report_to``, the
guard that keeps a failing tracker away from the run, and ``trackers.json``, which lets a resumed run continue
the same tracker run.

A tracker is a posttrain callback. :class:`Tracker` turns the five training events into four plain methods that
a subclass implements without handling any error itself::

    start(ctx, saved) -> dict        # on_train_begin: open the run (or reopen ``saved``), log config + provenance once;
                                     #   returns what trackers.json keeps (run id, project, URI)
    log_metrics(metrics, step)       # on_log / on_evaluate: one row of numbers (eval rows have eval_ keys)
    log_checkpoint(path, step)       # on_save, only when the option log_checkpoints is true
    finish(outcome)                  # on_train_end: finished / interrupted / failed, then close the run

The first exception any of them raises is reported once as a :class:`TrackerWarning` naming the tracker, the
event and the reason; the tracker then does nothing for the rest of the run and training goes on. Core's own
``metrics.jsonl`` is written before any plugin callback and holds every row regardless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from posttrain import ConfigError
from posttrain.config import build_config, config_to_dict

STATE_FILE = "trackers.json"  # in output_dir: {tracker name: what start() returned}
PACKAGE = "posttrain-trackers"


class TrackerWarning(RuntimeWarning):
    """A tracker could not start, log or finish; the run goes on without it."""


TrackerWarning.__module__ = "posttrain_trackers"


@dataclass
class TrackerOptions:
    """Options every tracker here takes; each tracker's class adds its own."""

    run_name: str | None = None  # the run's name in the tracker; default: the last part of output_dir
    log_checkpoints: bool = False  # upload each checkpoint-<step> directory as an artifact when it is saved


def parse_options(options_class: type, name: str, values: dict[str, Any]) -> Any:
    """``options_class`` from the mapping ``tracker_options[name]``, checked as core checks ``reward_kwargs``; every
    unknown key (with "did you mean", else the list of options) and wrong type at once."""
    known = [f.name for f in dataclasses.fields(options_class)]
    problems = []
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"the {name} options are {', '.join(known)}"
            problems.append(f"unknown option {key!r} for {name}; {hint}")
    if problems:
        raise ConfigError(problems, f"tracker_options.{name}")
    return build_config(options_class, dict(values), source=f"tracker_options.{name}")


class Tracker:
    """A posttrain callback sending a run to one experiment tracker. Subclasses set ``name`` (the ``report_to``
    name and entry-point name), ``library`` (the module to import), ``options_class``, and implement
    :meth:`start`, :meth:`log_metrics`, :meth:`log_checkpoint` and :meth:`finish`.

    Construct it with options (``WandbTracker(project="demo")``) or from a run's config
    (:func:`tracker_for`). Nothing happens until ``on_train_begin``, so building one on every process of a
    multi-process run costs nothing; core calls callbacks on the main process only.
    """

    name: ClassVar[str] = ""
    library: ClassVar[str] = ""
    options_class: ClassVar[type] = TrackerOptions

    def __init__(self, options: Any = None, **values: Any):
        self.options = options if options is not None else parse_options(self.options_class, self.name, values)
        self.output_dir = Path(".")
        self.disabled = False

    # -- what a tracker implements ------------------------------------------------------------------------------

    def start(self, ctx: Any, saved: dict | None) -> dict:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        raise NotImplementedError

    def finish(self, outcome: Any) -> None:
        raise NotImplementedError

    # -- the Callback events ------------------------------------------------------------------------------------

    def on_train_begin(self, ctx: Any) -> None:
        self.output_dir = Path(ctx.config.output_dir)
        self._guarded("on_train_begin", self._begin, ctx)

    def on_log(self, ctx: Any, metrics: dict[str, Any]) -> None:
        self._guarded("on_log", self.log_metrics, numbers(metrics), int(metrics.get("step", ctx.step)))

    def on_evaluate(self, ctx: Any, metrics: dict[str, Any]) -> None:
        self._guarded("on_evaluate", self.log_metrics, numbers(metrics), int(metrics.get("step", ctx.step)))

    def on_save(self, ctx: Any, checkpoint_dir: Path) -> None:
        if self.options.log_checkpoints:
            self._guarded("on_save", self.log_checkpoint, Path(checkpoint_dir), ctx.step)

    def on_train_end(self, ctx: Any, outcome: Any) -> None:
        self._guarded("on_train_end", self.finish, outcome)

    # -- helpers for subclasses ---------------------------------------------------------------------------------

    def run_name(self) -> str:
        return self.options.run_name or self.output_dir.resolve().name

    def run_config(self, ctx: Any) -> dict[str, Any]:
        """The resolved config, as saved in ``posttrain_config.yaml``."""
        return config_to_dict(ctx.config)

    def provenance(self) -> dict[str, Any]:
        """``output_dir/provenance.json`` (core writes it before ``on_train_begin``): plugins used, versions, git."""
        path = self.output_dir / "provenance.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # -- internals ----------------------------------------------------------------------------------------------

    def _begin(self, ctx: Any) -> None:
        resumed = ctx.step > 0  # the loop restored a checkpoint
        saved = read_state(self.output_dir).get(self.name) if resumed else None
        state = self.start(ctx, saved)
        write_state(self.output_dir, self.name, state, new_run=not resumed)

    def _guarded(self, event: str, func: Any, *args: Any) -> None:
        if self.disabled:
            return
        try:
            func(*args)
        except Exception as exc:
            self.disabled = True
            warnings.warn(
                f"{PACKAGE}: {self.name} failed in {event} ({type(exc).__name__}: {exc}); nothing more is sent to "
                f"{self.name} in this run and training continues (metrics.jsonl in {self.output_dir} has every row).",
                TrackerWarning,
                stacklevel=3,
            )


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a logged row, without ``step`` (metrics.jsonl writes the others as null)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def read_state(output_dir: Path) -> dict[str, Any]:
    path = Path(output_dir) / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def write_state(output_dir: Path, name: str, state: dict, new_run: bool = False) -> None:
    """Merge ``state`` under ``name`` into ``trackers.json``, atomically (write a temporary file, then rename).

    A new run in an overwritten ``output_dir`` drops what an earlier run left: core writes ``provenance.json`` just
    before ``on_train_begin``, so a ``trackers.json`` older than it belongs to another run, and resuming this one
    must never reopen that run's tracker runs.
    """
    path = Path(output_dir) / STATE_FILE
    data = read_state(output_dir)
    provenance = Path(output_dir) / "provenance.json"
    if new_run and data and provenance.is_file() and path.stat().st_mtime_ns < provenance.stat().st_mtime_ns:
        data = {}
    data[name] = state
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- activation by report_to (the posttrain_add_callbacks hook of each tracker module) -----------------------------


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun / accelerate set RANK; hooks run before the accelerator


def _provided_names() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group="posttrain.plugins")}


def _check_spelling(config: Any, name: str) -> None:
    """A ``tracker_options`` key one typo away from ``name`` that no installed plugin provides is a config error,
    reported before the model loads (core checks the ``report_to`` names themselves the same way)."""
    keys = [str(k) for k in getattr(config, "tracker_options", None) or {}]
    typos = [k for k in keys if k != name and difflib.get_close_matches(k.lower(), [name], n=1, cutoff=0.8)]
    typos = [t for t in typos if t not in _provided_names()]
    if typos:
        raise ConfigError(
            [
                f"tracker_options has options for {t!r}, which no installed plugin provides; did you mean {name!r}?"
                for t in typos
            ]
        )


def tracker_for(tracker_class: type[Tracker], config: Any) -> Tracker | None:
    """The tracker ``config`` asks for (``report_to`` names it, or says ``all`` and its library is installed), or
    None. Options are validated whenever ``tracker_options`` has them; a missing library is a warning naming the
    package to install, since a tracker never stops a run."""
    name = tracker_class.name
    _check_spelling(config, name)
    values = (getattr(config, "tracker_options", None) or {}).get(name)
    options = parse_options(tracker_class.options_class, name, values or {})
    report_to = {str(n).lower() for n in config.report_to}
    installed = importlib.util.find_spec(tracker_class.library) is not None
    if name not in report_to and not ("all" in report_to and installed):
        return None
    if not installed:
        if _main_process():
            warnings.warn(
                f"{PACKAGE}: report_to names {name!r}, but the {tracker_class.library} library is not installed, so "
                f"this run is not logged to {name} (metrics.jsonl has every row). Install it with "
                f"`pip install '{PACKAGE}[{name}]'`.",
                TrackerWarning,
                stacklevel=3,
            )
        return None
    return tracker_class(options)
