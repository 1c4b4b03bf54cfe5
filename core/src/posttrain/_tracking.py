"""Where metrics go, and how they are reduced before they get there.

``LogWindow`` accumulates the loss and the method's metrics between two logged steps and reduces them
over processes with one collective; ``Callbacks`` delivers events to ``metrics.jsonl`` (always),
TensorBoard (``report_to``) and the callbacks plugins add through ``posttrain_add_callbacks``, and
isolates their failures; ``ProgressBar`` shows progress on a terminal.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError
from posttrain._method import Metric, callback_problems

METRICS_FILE = "metrics.jsonl"
_KINDS = ("mean", "ratio", "sum", "total", "max", "min", "last")


def scalar(value: Any) -> float:
    import torch

    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def deferred(value: Any) -> Any:
    """What :func:`scalar` will return, without waiting for the device: a tensor stays a (detached, float32,
    0-dim) tensor until :func:`settle` turns a whole window of them into floats with one transfer. Reading a
    GPU tensor's value stalls the host until the GPU has caught up, so one read per metric per micro-batch
    would keep the host from queueing the next micro-batch's work while the GPU runs this one."""
    import torch

    if not isinstance(value, torch.Tensor):
        return float(value)
    if type(value) is not torch.Tensor:  # a DTensor (FSDP2's gradient norm) and other subclasses: read it now
        return scalar(value)
    return value.detach().float().mean()


def settle(values: list) -> None:
    """Replace the tensors in ``values`` (from :func:`deferred`) by their floats, in place, with one transfer
    per device; the floats equal what :func:`scalar` gives for the same values."""
    import torch

    by_device: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        for i, x in zip(indices, torch.stack([values[i] for i in indices]).tolist()):
            values[i] = x


class LogWindow:
    """Loss, gradient norms and metrics since the last logged step, reduced exactly when logged.

    The loss is logged as (sum of loss sums) / (sum of item counts) over the window and all processes.
    Each metric reduces by its :class:`~posttrain.Metric` kind; ``total`` metrics keep a running sum
    over the run in :attr:`totals`, which checkpoints save.
    """

    def __init__(self, accelerator: Any):
        import torch

        self.accelerator = accelerator
        self.totals: dict[str, float] = {}
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = self.loss_sum.new_zeros(())
        self.n = 0.0
        self.steps = 0
        self.grad_norms: list[float] = []
        self.metrics: dict[str, tuple[str, list[float], list[float]]] = {}  # name -> (kind, values, denominators)
        self.t0 = time.perf_counter()

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            metric = value if isinstance(value, Metric) else Metric("mean", value)
            kind, values, denominators = self.metrics.setdefault(name, (metric.kind, [], []))
            if kind != metric.kind:
                raise ValueError(f"metric {name!r} was reported as {kind!r} and as {metric.kind!r}; use one kind")
            values.append(deferred(metric.value))
            denominators.append(deferred(metric.denominator) if metric.kind == "ratio" else 1.0)

    def _settle(self) -> None:
        """The window's deferred values as floats (one device transfer), before anything reads them."""
        settle(self.grad_norms)
        for _, values, denominators in self.metrics.values():
            settle(values)
            settle(denominators)

    def add_step(self, loss_sum: Any, n_items: float) -> None:
        self.loss_sum += loss_sum
        self.n += float(n_items)
        self.steps += 1

    def reduce(self, learning_rate: float) -> dict[str, Any]:
        """The logged row for this window (loss, learning rate, grad norm, metrics, speed); starts a new window."""
        loss_sum = float(self.accelerator.reduce(self.loss_sum, reduction="sum"))
        elapsed = time.perf_counter() - self.t0
        row: dict[str, Any] = {"loss": loss_sum / self.n if self.n else float("nan"), "learning_rate": learning_rate}
        self._settle()
        if self.grad_norms:
            row["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        row.update(self.reduce_metrics())
        row["steps_per_second"] = self.steps / elapsed if elapsed > 0 else 0.0
        self._reset()
        return row

    def totals_for_checkpoint(self) -> dict[str, float]:
        """The run's ``total`` metrics including this window's not yet logged values, without starting a new
        window: what a checkpoint saves, so a resumed run counts exactly what the uninterrupted one does.
        Collective: every process calls it (checkpoints are saved by all processes)."""
        import torch

        self._settle()
        names = sorted(n for n, (kind, _, _) in self.metrics.items() if kind == "total")
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted({n for part in gather_object([names]) for n in part})
        totals = dict(self.totals)
        if not names:
            return totals
        local = torch.tensor(
            [sum(self.metrics[n][1]) if n in self.metrics else 0.0 for n in names], dtype=torch.float64
        )
        summed = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").tolist()
        for name, value in zip(names, summed):
            totals[name] = totals.get(name, 0.0) + value
        return totals

    def reduce_metrics(self) -> dict[str, float]:
        """Every metric of the window reduced over micro-batches and processes (one gather)."""
        import torch

        self._settle()
        accelerator = self.accelerator
        names = set(self.metrics)
        if accelerator.num_processes > 1:  # a process may lack a metric (no rejected rows in its shard)
            from accelerate.utils import gather_object

            kinds = {}
            for part in gather_object([{n: k for n, (k, _, _) in self.metrics.items()}]):
                kinds.update(part)
            names = set(kinds)
        else:
            kinds = {n: k for n, (k, _, _) in self.metrics.items()}
        names = sorted(names)
        if not names:
            return {}
        # per name: [sum of values, sum of denominators, max, min, last value, has values]
        local = torch.zeros((len(names), 6), dtype=torch.float64)
        for i, name in enumerate(names):
            _, values, denominators = self.metrics.get(name, (None, [], []))
            if values:
                local[i] = torch.tensor(
                    [sum(values), sum(denominators), max(values), min(values), values[-1], 1.0], dtype=torch.float64
                )
        gathered = accelerator.gather(local.to(accelerator.device)).reshape(-1, len(names), 6).cpu()
        present = gathered[:, :, 5] > 0
        out = {}
        for i, name in enumerate(names):
            rows = gathered[present[:, i], i]
            if len(rows) == 0:
                continue
            kind = kinds[name]
            if kind in ("mean", "ratio"):
                den = float(rows[:, 1].sum())
                value = float(rows[:, 0].sum()) / den if den else float("nan")
            elif kind == "sum":
                value = float(rows[:, 0].sum())
            elif kind == "total":
                value = self.totals[name] = self.totals.get(name, 0.0) + float(rows[:, 0].sum())
            elif kind == "max":
                value = float(rows[:, 2].max())
            elif kind == "min":
                value = float(rows[:, 3].min())
            else:  # last
                value = float(rows[:, 4].mean())
            out[name] = value
        return out


class JsonlLogger:
    """One JSON object per logged step; on resume, rows after the resumed step are dropped."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        from posttrain._run_guard import writing

        self.path = Path(output_dir) / METRICS_FILE
        with writing(METRICS_FILE, self.path.parent):
            if resume_step is not None and self.path.is_file():
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
                self.path.write_text("".join(line + "\n" for line in kept))
            elif self.path.exists():
                self.path.unlink()

    def on_log(self, ctx: Any, metrics: dict) -> None:
        from posttrain._run_guard import writing

        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with writing(METRICS_FILE, self.path.parent), open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    on_evaluate = on_log


class TensorBoardLogger:
    def __init__(self, output_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "report_to includes 'tensorboard' but it is not installed; run `pip install tensorboard`."
            ) from None
        self.writer = SummaryWriter(str(Path(output_dir) / "runs"))

    def on_log(self, ctx: Any, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()

    on_evaluate = on_log

    def on_train_end(self, ctx: Any, outcome: Any) -> None:
        self.writer.close()


class Callbacks:
    """Delivers training events to callbacks on the main process; a callback that raises is reported once,
    naming it, and disabled, so a logger never kills or corrupts a run. ``metrics.jsonl`` is core's own
    record and is the exception: its failures propagate."""

    def __init__(self, callbacks: list[Any], main: bool):
        self.items: list[Any] = list(callbacks) if main else []
        self.critical: set[int] = set()
        problems = [p for c in self.items for p in callback_problems(c)]
        if problems:
            from posttrain._errors import PluginError

            raise PluginError("a callback breaks the plugin contract: " + "; ".join(problems))

    def prepend(self, core_loggers: list[Any]) -> None:
        self.items[:0] = core_loggers
        self.critical = {id(c) for c in core_loggers if isinstance(c, JsonlLogger)}

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self.items):
            handler = getattr(callback, event, None)
            if handler is None:
                continue
            call_args = args
            if event == "on_train_end" and _takes_one_argument(handler):
                call_args = args[:1]  # the 0.1 form on_train_end(ctx)
            if id(callback) in self.critical:
                handler(*call_args)
                continue
            try:
                handler(*call_args)
            except Exception as exc:
                self.items.remove(callback)
                name = f"{type(callback).__module__}.{type(callback).__qualname__}"
                warnings.warn(
                    f"callback {name} failed in {event} ({type(exc).__name__}: {exc}); it is disabled for the rest "
                    "of this run and training continues.",
                    RuntimeWarning,
                    stacklevel=2,
                )


def _takes_one_argument(handler: Any) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind is not inspect.Parameter.VAR_POSITIONAL


class ProgressBar:
    """Training progress on stderr, in the form the reader can use.

    On a terminal: a live rich bar with loss, learning rate and throughput. Anywhere else (a log
    file, CI, a job scheduler), where a live bar shows nothing until the end: one plain line per
    logged step -- step/total, loss, learning rate, steps/s and the time left. Silent when disabled.
    """

    def __init__(self, total: int, start: int, description: str, enabled: bool = True, stream: Any = None):
        self.enabled = enabled
        self.total, self.description = total, description
        self.start_time, self.start_step = time.perf_counter(), start
        self.stream = stream  # None: sys.stderr at the time of writing
        self.live = enabled and _isatty(self._out())
        if not self.live:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=self._out()),
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, completed=start, info="")
        self.progress.start()

    def _out(self) -> Any:
        import sys

        return self.stream if self.stream is not None else sys.stderr

    def _rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.start_time
        return (step - self.start_step) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Called after every optimizer step; ``metrics`` only on logged steps."""
        if not self.enabled:
            return
        if not self.live:
            if metrics is not None:
                self._write_line(step, metrics)
            return
        info = ""
        if metrics:
            parts = [
                f"loss {metrics['loss']:.4f}" if "loss" in metrics else "",
                f"lr {metrics.get('learning_rate', 0):.2e}",
                f"{self._rate(step):.2f} it/s",
            ]
            info = "  ".join(p for p in parts if p)
        if info:
            self.progress.update(self.task, completed=step, info=info)
        else:
            self.progress.update(self.task, completed=step)

    def _write_line(self, step: int, metrics: dict) -> None:
        rate = self._rate(step)
        eta = _duration((self.total - step) / rate) if rate > 0 else "?"
        width = len(str(self.total))
        parts = [f"{self.description}: step {step:>{width}}/{self.total} ({100 * step / max(self.total, 1):3.0f}%)"]
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)):
            parts.append(f"loss {loss:.4f}")
        if isinstance(metrics.get("learning_rate"), (int, float)):
            parts.append(f"lr {metrics['learning_rate']:.2e}")
        parts += [f"{rate:.2f} steps/s", f"ETA {eta}"]
        out = self._out()
        out.write("  ".join(parts) + "\n")
        out.flush()

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(value: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    seconds = round(value)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def build_loggers(config: Any, output_dir: Path, resume_step: int | None) -> list[Any]:
    loggers: list[Any] = [JsonlLogger(output_dir, resume_step)]
    wanted = {r.lower() for r in config.report_to}
    # names other than these (e.g. "wandb") are for plugin callbacks to recognise
    if "tensorboard" in wanted or "all" in wanted:
        loggers.append(TensorBoardLogger(output_dir))
    return loggers
