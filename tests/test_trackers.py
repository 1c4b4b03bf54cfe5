"""Experiment trackers through the command line: `--report_to` reaches the installed posttrain-trackers hooks, and a
known tracker whose package is missing is named with the command that installs it."""

from __future__ import annotations

import json
import warnings

import pytest
from posttrain import _preflight as preflight
from posttrain import _resume as resume
from posttrain.cli import main


@pytest.fixture
def toy_dist(fake_site, toy_method_source):
    fake_site.add(
        "posttrain-toy", methods={"toy": "pt_toy_trackers:Toy"}, module="pt_toy_trackers", code=toy_method_source
    )
    return fake_site


def test_report_to_on_the_command_line_reaches_the_tracker_plugin(toy_dist, tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("posttrain_trackers", reason="posttrain-trackers is not installed")
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'posttrain-trackers[wandb]'")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "pt-cli"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"abc {i} " * (1 + i % 3)}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    args = ["train", "toy", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out)]
    args += ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4"]
    args += ["--report_to", "wandb", "--tracker_options", "{wandb: {tags: [cli]}}", "--disable_progress_bar"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert main(args) == 0
    state = json.loads((out / "trackers.json").read_text())["wandb"]
    assert state["project"] == "pt-cli"  # WANDB_PROJECT, W&B's own variable, still works
    assert list((out / "wandb").glob(f"offline-run-*-{state['run_id']}/run-{state['run_id']}.wandb"))
    assert "tracker_options:\n  wandb:\n    tags:\n    - cli\n" in (out / "posttrain_config.yaml").read_text()


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_command(runner, monkeypatch, name):
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "posttrain-trackers")
    (problem,) = preflight.report_to_problems(runner.config("missing", report_to=[name]))
    assert f"report_to names {name!r}, which no installed plugin recognises" in problem
    assert f"pip install 'posttrain-trackers[{name}]'" in problem


def test_installed_trackers_are_recognised_and_their_typos_get_a_suggestion(runner):
    pytest.importorskip("posttrain_trackers", reason="posttrain-trackers is not installed")
    assert preflight.report_to_problems(runner.config("ok", report_to=["wandb", "mlflow", "trackio"])) == []
    (problem,) = preflight.report_to_problems(runner.config("typo", report_to=["wandbb"]))
    assert "did you mean 'wandb'?" in problem


def test_a_resumed_run_may_change_its_tracker_options():
    assert "tracker_options" in resume.SAFE_TO_CHANGE and "report_to" in resume.SAFE_TO_CHANGE
