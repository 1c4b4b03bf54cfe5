"""Trackio: ``report_to: [trackio]``, options under ``tracker_options: {trackio: {...}}``.

Trackio is local-first: runs go to a SQLite database per project in ``TRACKIO_DIR`` (default
``~/.cache/huggingface/trackio``; ``trackio show`` opens the dashboard), or to a Hugging Face Space with
``space_id``. One Trackio run per training run: the resolved config and the provenance as the run's config, every
logged row at its ``step``, checkpoints as ``model`` artifacts when ``log_checkpoints`` is true, and the end state
as an alert (INFO finished, WARN interrupted, ERROR failed). Trackio's environment variables (``TRACKIO_DIR``,
``TRACKIO_SPACE_ID``, ``TRACKIO_SERVER_URL`` ...) keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain import hookimpl
from posttrain.hookspecs import CallbackRegistry

from posttrain_trackers.tracker import Tracker, TrackerOptions, tracker_for

ALERT_LEVELS = {"finished": "INFO", "interrupted": "WARN", "failed": "ERROR"}


@dataclass
class TrackioOptions(TrackerOptions):
    """Options of ``report_to: [trackio]``, set under ``tracker_options: {trackio: {...}}``."""

    project: str | None = None  # default: TRACKIO_PROJECT, else "posttrain"
    group: str | None = None  # runs of a group are shown together
    space_id: str | None = None  # log to this Hugging Face Space instead of locally; default: TRACKIO_SPACE_ID


class TrackioTracker(Tracker):
    """Logs a run to Trackio. ``TrackioTracker(project="demo")`` with the Python API."""

    name = "trackio"
    library = "trackio"
    options_class = TrackioOptions

    def start(self, ctx: Any, saved: dict | None) -> dict:
        import trackio

        o = self.options
        resuming = bool(saved)
        project = (saved or {}).get("project") or o.project or os.environ.get("TRACKIO_PROJECT") or "posttrain"
        self.run = trackio.init(
            project=project,
            name=(saved or {}).get("run_name") or self.run_name(),
            group=o.group,
            space_id=o.space_id,
            # Trackio keeps one config per run and a resumed run writes it again: the same values, plus the
            # resume_from_checkpoint that continued it
            config={**self.run_config(ctx), "posttrain_provenance": self.provenance()},
            resume="allow" if resuming else "never",
            embed=False,
        )
        return {"project": project, "run_name": self.run.name, "run_id": self.run.id}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        self.run.log_artifact(
            checkpoint_dir, name=f"{self.run.name}-checkpoint", type="model", aliases=[f"step-{step}"]
        )

    def finish(self, outcome: Any) -> None:
        from trackio import AlertLevel

        text = f"status {outcome.status} at step {outcome.global_step}"
        if outcome.error is not None:
            text += f": {type(outcome.error).__name__}: {outcome.error}"
        level = getattr(AlertLevel, ALERT_LEVELS[outcome.status])
        self.run.alert(title=f"training {outcome.status}", text=text, level=level, step=outcome.global_step)
        self.run.finish()


@hookimpl
def posttrain_add_callbacks(registry: CallbackRegistry, config: Any) -> None:
    tracker = tracker_for(TrackioTracker, config)
    if tracker is not None:
        registry.add(tracker)


OPTIONS = TrackioOptions  # what `posttrain info trackio` lists (read from tracker_options.trackio)
