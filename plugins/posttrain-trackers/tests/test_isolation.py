"""A tracker that fails (raises, disk full, server down) warns once, naming itself and the reason, and the run
finishes exactly as it would without it."""

from __future__ import annotations

import socket
import time
import warnings

import pytest
from posttrain_trackers import MLflowTracker, Tracker, TrackerWarning


class DiskFull(Tracker):
    """A tracker whose disk fills up at its second row."""

    name = "diskfull"

    def __init__(self):
        super().__init__()
        self.calls = []

    def start(self, ctx, saved):
        self.calls.append("start")
        return {"opened": True}

    def log_metrics(self, metrics, step):
        self.calls.append(step)
        if len(self.calls) == 3:
            raise OSError(28, "No space left on device")

    def log_checkpoint(self, checkpoint_dir, step):
        self.calls.append("checkpoint")

    def finish(self, outcome):
        self.calls.append("finish")


def tracker_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TrackerWarning)]


def comparable(rows):
    return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in rows]


def test_a_failing_tracker_warns_once_and_changes_nothing(trainer):
    tracker = DiskFull()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = trainer.train(trainer.config("with", save_steps=2), [tracker])
    reports = tracker_warnings(record)
    assert len(reports) == 1, reports
    assert "posttrain-trackers: diskfull failed in on_log (OSError: [Errno 28] No space left on device)" in reports[0]
    assert "training continues" in reports[0]
    assert not [w for w in record if "is disabled for the rest of this run" in str(w.message)]  # core saw no error
    assert tracker.calls == ["start", 1, 2]  # nothing after the failure, not even finish
    assert (trainer.tmp / "with" / "model.safetensors").is_file()
    assert (trainer.tmp / "with" / "checkpoint-2").is_dir()
    assert comparable(rows) == comparable(trainer.train(trainer.config("without", save_steps=2)))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_mlflow_server_down_warns_at_start_and_training_continues(trainer):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'posttrain-trackers[mlflow]'")
    uri = f"http://127.0.0.1:{closed_port()}"
    config = trainer.config(report_to=["mlflow"], tracker_options={"mlflow": {"tracking_uri": uri}})
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = trainer.train(config, [MLflowTracker(tracking_uri=uri)])
    assert time.monotonic() - start < 60  # no retrying for minutes against a server that is not there
    reports = tracker_warnings(record)
    assert (
        len(reports) == 1
        and f"mlflow failed in on_train_begin (ConnectionError: the MLflow server at {uri}" in (reports[0])
    )
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_trackio_disk_full_mid_run(trainer, monkeypatch):
    """The real Trackio tracker, its library failing on the third row (the evaluation at step 2) as a full disk would."""
    pytest.importorskip("trackio", reason="trackio is not installed: pip install 'posttrain-trackers[trackio]'")
    import trackio.run
    from posttrain_trackers import TrackioTracker

    real_log, calls = trackio.run.Run.log, []

    def log(self, metrics, step=None):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_log(self, metrics, step=step)

    monkeypatch.setattr(trackio.run.Run, "log", log)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = trainer.train(trainer.config(), [TrackioTracker(project="pt-diskfull")])
    reports = tracker_warnings(record)
    assert (
        len(reports) == 1
        and "trackio failed in on_evaluate (OSError: [Errno 28] No space left on device)" in reports[0]
    )
    assert calls == [1, 2, 2] and [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
