"""Weights & Biases: ``report_to: [wandb]``, options under ``tracker_options: {wandb: {...}}``.

One W&B run per training run: the resolved config and the provenance as the run's config, every logged row at its
``step`` (evaluation rows keep their ``eval_`` keys), checkpoints as ``model`` artifacts when ``log_checkpoints``
is true, and the end state in the summary (``posttrain/status``) and the exit code. W&B's own environment variables
(``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE``, ``WANDB_API_KEY``, ``WANDB_DIR`` ...) keep working; an option
given here wins over them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain import hookimpl
from posttrain.hookspecs import CallbackRegistry

from posttrain_trackers.tracker import Tracker, TrackerOptions, tracker_for

EXIT_CODES = {"finished": 0, "failed": 1, "interrupted": 130}  # 130: as `posttrain train` exits after Ctrl-C


@dataclass
class WandbOptions(TrackerOptions):
    """Options of ``report_to: [wandb]``, set under ``tracker_options: {wandb: {...}}``."""

    project: str | None = None  # default: WANDB_PROJECT, else "posttrain"
    entity: str | None = None  # team or user; default: WANDB_ENTITY, else your default entity
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # default: WANDB_RUN_GROUP
    notes: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None  # default: WANDB_MODE, else online
    dir: str | None = None  # where wandb keeps its files; default: WANDB_DIR, else output_dir


class WandbTracker(Tracker):
    """Logs a run to Weights & Biases. ``WandbTracker(project="demo", mode="offline")`` with the Python API."""

    name = "wandb"
    library = "wandb"
    options_class = WandbOptions

    def start(self, ctx: Any, saved: dict | None) -> dict:
        import wandb

        o = self.options
        resume_id = (saved or {}).get("run_id")
        self.run = wandb.init(
            project=o.project or os.environ.get("WANDB_PROJECT") or "posttrain",
            entity=o.entity,
            name=self.run_name(),
            tags=o.tags or None,
            group=o.group,
            notes=o.notes,
            mode=o.mode,
            dir=o.dir or os.environ.get("WANDB_DIR") or str(self.output_dir),
            id=resume_id,
            resume="allow" if resume_id else None,
            # once per W&B run: a resumed run keeps the config it started with
            config=None if resume_id else {**self.run_config(ctx), "posttrain_provenance": self.provenance()},
            reinit="create_new",  # never touch a run the user's own code opened
        )
        return {"run_id": self.run.id, "project": self.run.project, "entity": self.run.entity, "url": self.run.url}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        import wandb

        artifact = wandb.Artifact(name=f"checkpoint-{self.run.id}", type="model", metadata={"step": step})
        artifact.add_dir(str(checkpoint_dir))
        self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def finish(self, outcome: Any) -> None:
        summary = {"posttrain/status": outcome.status, "posttrain/global_step": outcome.global_step}
        if outcome.error is not None:
            summary["posttrain/error"] = f"{type(outcome.error).__name__}: {outcome.error}"
        self.run.summary.update(summary)
        self.run.finish(exit_code=EXIT_CODES[outcome.status])


@hookimpl
def posttrain_add_callbacks(registry: CallbackRegistry, config: Any) -> None:
    tracker = tracker_for(WandbTracker, config)
    if tracker is not None:
        registry.add(tracker)


OPTIONS = WandbOptions  # what `posttrain info wandb` lists (read from tracker_options.wandb)
