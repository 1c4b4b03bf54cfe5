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
    """A rich progress bar with loss, learning rate and throughput; silent when disabled."""

    def __init__(self, total: int, start: int, description: str, enabled: bool = True):
        self.enabled = enabled
        self.start_time, self.start_step = time.perf_counter(), start
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, metrics: dict | None = None) -> None:
        if not self.enabled:
            return
        info = ""
        if metrics:
            elapsed = time.perf_counter() - self.start_time
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            parts = [
                f"loss {metrics['loss']:.4f}" if "loss" in metrics else "",
                f"lr {metrics.get('learning_rate', 0):.2e}",
                f"{rate:.2f} it/s",
            ]
            info = "  ".join(p for p in parts if p)
        if info:
            self.progress.update(self.task, completed=step, info=info)
        else:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


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
