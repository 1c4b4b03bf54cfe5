"""MLflow: ``report_to: [mlflow]``, options under ``tracker_options: {mlflow: {...}}``.

One MLflow run per training run, through ``MlflowClient`` (no global active run, so a user's own ``mlflow.start_run``
is left alone): the resolved config as params (nested keys joined with dots) and ``posttrain_config.yaml`` plus
``provenance.json`` as artifacts under ``posttrain/``, every logged row at its ``step``, checkpoints under
``checkpoints/checkpoint-<step>`` when ``log_checkpoints`` is true, and the end state as the run status (FINISHED,
KILLED for an interrupted run, FAILED) with a ``posttrain.status`` tag. MLflow's environment variables
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID``, ``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_HTTP_REQUEST_*``) keep working; an option given here wins over them.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain import hookimpl
from posttrain.hookspecs import CallbackRegistry

from posttrain_trackers.tracker import Tracker, TrackerOptions, tracker_for

STATUSES = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
# MLflow's limits (mlflow.utils.validation): params per batch, metrics per batch, param and tag value lengths
MAX_PARAMS, MAX_METRICS, MAX_PARAM_LENGTH, MAX_TAG_LENGTH = 100, 1000, 6000, 8000
BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # MLflow allows alphanumerics, _ - . space : /


@dataclass
class MLflowOptions(TrackerOptions):
    """Options of ``report_to: [mlflow]``, set under ``tracker_options: {mlflow: {...}}``."""

    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else MLflow's (sqlite:///mlflow.db here)
    experiment_name: str | None = None  # default: MLFLOW_EXPERIMENT_NAME, else "Default"
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags


class MLflowTracker(Tracker):
    """Logs a run to MLflow. ``MLflowTracker(tracking_uri="http://127.0.0.1:5000")`` with the Python API."""

    name = "mlflow"
    library = "mlflow"
    options_class = MLflowOptions

    def start(self, ctx: Any, saved: dict | None) -> dict:
        from mlflow import MlflowClient

        o = self.options
        self.client = MlflowClient(tracking_uri=o.tracking_uri)  # None: MLFLOW_TRACKING_URI, else the default
        uri = self.client.tracking_uri
        check_reachable(uri)
        saved = saved if saved and saved.get("tracking_uri") == uri else None  # a run of this store only
        if saved:  # resume: the same run, its config already logged
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = os.environ.get("MLFLOW_RUN_ID")  # a run the user created, as mlflow.start_run honours it
            if self.run_id:
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment_id = self._experiment_id(o.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME"))
                self.run_id = self.client.create_run(experiment_id, run_name=self.run_name()).info.run_id
            self._log_config(ctx)
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(BAD_KEY_CHARS.sub("_", k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS])

    def log_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        self.client.log_artifacts(self.run_id, str(checkpoint_dir), f"checkpoints/{checkpoint_dir.name}")

    def finish(self, outcome: Any) -> None:
        self.client.set_tag(self.run_id, "posttrain.status", outcome.status)
        self.client.set_tag(self.run_id, "posttrain.global_step", str(outcome.global_step))
        if outcome.error is not None:
            error = f"{type(outcome.error).__name__}: {outcome.error}"
            self.client.set_tag(self.run_id, "posttrain.error", error[:MAX_TAG_LENGTH])
        self.client.set_terminated(self.run_id, status=STATUSES[outcome.status])

    # -- helpers ------------------------------------------------------------------------------------------------

    def _experiment_id(self, name: str | None) -> str:
        name = name or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created by a concurrent run in the meantime
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _provenance_tags(self) -> dict[str, str]:
        provenance = self.provenance()
        used = provenance.get("plugins_used", [])
        tags = {
            "posttrain.version": str(provenance.get("posttrain", "")),
            "posttrain.plugins": "; ".join(
                f"{p['kind']} {p['name']}: {p['package']} {p['version']} ({p['status']})" for p in used
            ),
        }
        if provenance.get("git_commit"):
            tags["mlflow.source.git.commit"] = str(provenance["git_commit"])
        return {k: v[:MAX_TAG_LENGTH] for k, v in tags.items() if v}

    def _log_config(self, ctx: Any) -> None:
        """Once per MLflow run: the config as params, provenance and the user's tags, the two files as artifacts."""
        from mlflow.entities import Param, RunTag

        tags = {**self._provenance_tags(), **{str(k): str(v) for k, v in self.options.tags.items()}}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flatten(self.run_config(ctx)).items()]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS])
        for file in ("posttrain_config.yaml", "provenance.json"):
            if (self.output_dir / file).is_file():
                self.client.log_artifact(self.run_id, str(self.output_dir / file), "posttrain")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1]}`` -> ``{"a.b": "1", "c": "[1]"}``: MLflow params are flat strings."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def check_reachable(uri: str) -> None:
    """Fail at once when an HTTP tracking server does not answer, instead of after MLflow's retries (minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answered (a proxy or an auth layer may refuse /health): reachable
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"the MLflow server at {uri} does not answer ({reason})") from None


@hookimpl
def posttrain_add_callbacks(registry: CallbackRegistry, config: Any) -> None:
    tracker = tracker_for(MLflowTracker, config)
    if tracker is not None:
        registry.add(tracker)


OPTIONS = MLflowOptions  # what `posttrain info mlflow` lists (read from tracker_options.mlflow)
