"""MLflow: tiny runs read back with MlflowClient, from a local SQLite store and from a local `mlflow server`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'posttrain-trackers[mlflow]'")

from mlflow import MlflowClient
from posttrain_trackers import trackers_for


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An empty SQLite store with MLflow's tables, made once: creating them costs seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("mlflow-template") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path):
    """A fresh SQLite store for one test; its path."""
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_store, path)
    return path


def logged_points(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    run = client.get_run(run_id)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, path))


def test_interrupted_then_resumed_run_is_one_mlflow_run_equal_to_metrics_jsonl(trainer, monkeypatch, store):
    """MLflow's own environment variables pick the store and the experiment; the options add tags and checkpoints."""
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pt-mlflow")
    options = {"mlflow": {"tags": {"team": "posttrain"}, "log_checkpoints": True}}
    config = trainer.config(report_to=["mlflow"], tracker_options=options)
    trainer.train(config, [*trackers_for(config), trainer.interrupt_at(2)])
    client = MlflowClient(uri)
    run = only_run(client, "pt-mlflow")
    assert (run.info.status, run.data.tags["posttrain.status"]) == ("KILLED", "interrupted")

    resumed = trainer.config(report_to=["mlflow"], tracker_options=options, resume_from_checkpoint="latest")
    trainer.train(resumed, trackers_for(resumed))

    run = only_run(client, "pt-mlflow")  # the resumed run continued the same MLflow run
    assert (run.info.status, run.data.tags["posttrain.status"]) == ("FINISHED", "finished")
    assert run.info.run_name == "run" and run.data.tags["team"] == "posttrain"
    assert logged_points(client, run.info.run_id) == trainer.expected_points(config.output_dir)
    params = run.data.params
    assert params["learning_rate"] == "0.001" and params["report_to"] == '["mlflow"]'
    assert params["tracker_options.mlflow.log_checkpoints"] == "true" and params["resume_from_checkpoint"] == "null"
    provenance = json.loads((trainer.tmp / "run" / "provenance.json").read_text())
    assert run.data.tags["posttrain.version"] == provenance["posttrain"]
    assert artifact_paths(client, run.info.run_id, "posttrain") == [
        "posttrain/posttrain_config.yaml",
        "posttrain/provenance.json",
    ]
    checkpoint = artifact_paths(client, run.info.run_id, "checkpoints/checkpoint-2")
    assert "checkpoints/checkpoint-2/model.safetensors" in checkpoint
    state = json.loads((trainer.tmp / "run" / "trackers.json").read_text())["mlflow"]
    assert state == {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri}


@pytest.fixture
def mlflow_server(store, tmp_path):
    """`mlflow server` on a free loopback port, SQLite behind it; yields its URL and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store}"]
    command += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner for a test
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn worker; nothing on them is needed any more
        proc.wait()


@pytest.mark.slow
def test_runs_logged_to_a_local_mlflow_server(trainer, mlflow_server):
    """A finished run equals metrics.jsonl; a failed one (NaN loss) ends FAILED with the error as a tag."""
    options = {"mlflow": {"tracking_uri": mlflow_server, "experiment_name": "pt-server", "run_name": "ok"}}
    config = trainer.config("ok", report_to=["mlflow"], tracker_options=options)
    trainer.train(config, trackers_for(config))
    client = MlflowClient(mlflow_server)
    run = only_run(client, "pt-server")
    assert run.info.status == "FINISHED" and run.info.run_name == "ok"
    assert logged_points(client, run.info.run_id) == trainer.expected_points(config.output_dir)
    assert run.data.params["learning_rate"] == "0.001"

    options["mlflow"]["experiment_name"] = "pt-server-failed"
    failed = trainer.config("failed", report_to=["mlflow"], tracker_options=options, nan_at_step=2)
    from posttrain.loop import NonFiniteLossError

    trainer.train(failed, trackers_for(failed), expect_error=NonFiniteLossError)
    run = only_run(client, "pt-server-failed")
    assert (run.info.status, run.data.tags["posttrain.status"]) == ("FAILED", "failed")
    assert run.data.tags["posttrain.error"].startswith("NonFiniteLossError: loss is nan at step 3")
    assert logged_points(client, run.info.run_id) == trainer.expected_points(failed.output_dir)
