"""Where metrics go: ``metrics.jsonl`` (always), TensorBoard (``report_to``), a progress bar,
and any callbacks that plugins add through ``posttrain_add_callbacks``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError

METRICS_FILE = "metrics.jsonl"


class JsonlLogger:
    """One JSON object per logged step; on resume, rows after the resumed step are dropped."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
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
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as fh:
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

    def on_train_end(self, ctx: Any) -> None:
        self.writer.close()


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


def call(callbacks: list[Any], event: str, *args: Any) -> None:
    for callback in callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(*args)
