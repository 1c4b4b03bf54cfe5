"""Trackio: a tiny run, interrupted and resumed, read back from Trackio's own SQLite store."""

from __future__ import annotations

import json

import pytest

trackio = pytest.importorskip("trackio", reason="trackio is not installed: pip install 'posttrain-trackers[trackio]'")

from posttrain_trackers import trackers_for  # noqa: E402
from trackio.sqlite_storage import SQLiteStorage  # noqa: E402


def logged_points(project: str, run: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, run):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                out.setdefault(key, {})[row["step"]] = value
    return out


def test_interrupted_then_resumed_run_is_one_trackio_run_equal_to_metrics_jsonl(trainer):
    options = {"trackio": {"project": "pt-trackio", "run_name": "toy-1", "log_checkpoints": True}}
    config = trainer.config(report_to=["trackio"], tracker_options=options)
    trainer.train(config, [*trackers_for(config), trainer.interrupt_at(2)])
    alerts = SQLiteStorage.get_alerts("pt-trackio", "toy-1")
    assert [(a["title"], a["level"], a["step"]) for a in alerts] == [("training interrupted", "warn", 2)]

    options = {"trackio": {"project": "pt-trackio", "run_name": "toy-1"}}  # a resumed run may change them
    resumed = trainer.config(report_to=["trackio"], tracker_options=options, resume_from_checkpoint="latest")
    rows = trainer.train(resumed, trackers_for(resumed))

    assert SQLiteStorage.get_runs("pt-trackio") == ["toy-1"]  # the resumed run continued the same Trackio run
    assert {r["step"] for r in rows} == {1, 2, 3, 4} and any("eval_loss" in r for r in rows)
    assert logged_points("pt-trackio", "toy-1") == trainer.expected_points(config.output_dir)
    alerts = SQLiteStorage.get_alerts("pt-trackio", "toy-1")
    assert ("training finished", "info", 4) in [(a["title"], a["level"], a["step"]) for a in alerts]

    logged = SQLiteStorage.get_run_config("pt-trackio", "toy-1")
    assert logged["learning_rate"] == 1e-3 and logged["tracker_options"] == options
    assert logged["report_to"] == ["trackio"] and logged["resume_from_checkpoint"] == "latest"  # the latest config
    provenance = json.loads((trainer.tmp / "run" / "provenance.json").read_text())
    assert logged["posttrain_provenance"]["posttrain"] == provenance["posttrain"]
    assert logged["posttrain_provenance"]["plugins_used"] == provenance["plugins_used"]

    artifacts = SQLiteStorage.get_run_artifacts("pt-trackio", "toy-1", None)["output"]
    assert any(a["name"] == "toy-1-checkpoint" for a in artifacts), artifacts
    state = json.loads((trainer.tmp / "run" / "trackers.json").read_text())["trackio"]
    assert state["project"] == "pt-trackio" and state["run_name"] == "toy-1"
