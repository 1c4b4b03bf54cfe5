"""Activation by report_to, typed options from tracker_options, and what is said when something is missing."""

from __future__ import annotations

import os
import sys
import warnings
from importlib import metadata

import pytest
from posttrain import ConfigError
from posttrain.config import load_config, save_config
from posttrain_trackers import (
    TRACKERS,
    MLflowOptions,
    MLflowTracker,
    TrackerWarning,
    TrackioTracker,
    WandbOptions,
    WandbTracker,
    mlflow,
    tracker_for,
    trackio,
    wandb,
)

HOOK_MODULES = (wandb, mlflow, trackio)


class Registry:
    def __init__(self):
        self.callbacks = []

    def add(self, callback):
        self.callbacks.append(callback)


def added(config) -> list[type]:
    """The tracker classes the three posttrain_add_callbacks hooks add for ``config``."""
    registry = Registry()
    for module in HOOK_MODULES:
        module.posttrain_add_callbacks(registry=registry, config=config)
    return [type(c) for c in registry.callbacks]


def test_entry_points_name_the_hook_modules():
    eps = {
        ep.name: ep.value
        for ep in metadata.entry_points(group="posttrain.plugins")
        if ep.name in ("wandb", "mlflow", "trackio")
    }
    assert eps == {
        "wandb": "posttrain_trackers.wandb",
        "mlflow": "posttrain_trackers.mlflow",
        "trackio": "posttrain_trackers.trackio",
    }
    assert {cls.name for cls in TRACKERS} == set(eps)


@pytest.mark.parametrize(
    ("report_to", "expected"),
    [
        ([], []),
        (["tensorboard"], []),
        (["none"], []),
        (["wandb"], [WandbTracker]),
        (["MLflow", "trackio"], [MLflowTracker, TrackioTracker]),
        (["all"], [WandbTracker, MLflowTracker, TrackioTracker]),  # every tracker whose library is installed
    ],
)
def test_report_to_chooses_the_trackers(trainer, report_to, expected):
    if report_to == ["all"]:
        for cls in TRACKERS:
            pytest.importorskip(cls.library)
    assert added(trainer.config(report_to=report_to)) == expected


def test_building_trackers_has_no_side_effects(trainer, tmp_path):
    """Hooks run on every process of a multi-process run, before the accelerator exists: nothing may happen yet."""
    config = trainer.config(report_to=["wandb", "mlflow", "trackio"])
    before = sorted(os.listdir(tmp_path))
    assert len(added(config)) == 3
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists(config.output_dir)


def test_options_are_typed_and_checked_all_at_once(trainer):
    config = trainer.config(
        report_to=["wandb"], tracker_options={"wandb": {"projet": "x", "log_checkpoints": "maybe", "zzz": 1}}
    )
    with pytest.raises(ConfigError) as error:
        added(config)
    message = str(error.value)
    assert "tracker_options.wandb" in message
    assert "unknown option 'projet' for wandb; did you mean 'project'?" in message
    assert "unknown option 'zzz' for wandb; the wandb options are run_name, log_checkpoints, project" in message
    config.tracker_options = {"wandb": {"log_checkpoints": "maybe"}}
    with pytest.raises(ConfigError, match="log_checkpoints: expected true or false, got 'maybe'"):
        added(config)
    config.tracker_options = {"wandb": {"project": "p", "tags": "a,b", "log_checkpoints": "true", "mode": "offline"}}
    (tracker,) = [t for t in [tracker_for(WandbTracker, config)] if t]
    assert tracker.options == WandbOptions(project="p", tags=["a", "b"], log_checkpoints=True, mode="offline")


def test_options_are_checked_even_when_report_to_does_not_name_the_tracker(trainer):
    config = trainer.config(report_to=[], tracker_options={"mlflow": {"tracking_url": "x"}})
    with pytest.raises(ConfigError, match="did you mean 'tracking_uri'"):
        added(config)


def test_options_for_a_misspelled_tracker_are_a_config_error(trainer):
    with pytest.raises(ConfigError, match="options for 'mlfow', which no installed plugin provides; did you mean"):
        added(trainer.config(report_to=["mlflow"], tracker_options={"mlfow": {"run_name": "x"}}))


def test_python_api_options(trainer):
    assert MLflowTracker(tracking_uri="sqlite:///x.db").options == MLflowOptions(tracking_uri="sqlite:///x.db")
    with pytest.raises(ConfigError, match="did you mean 'experiment_name'"):
        MLflowTracker(experiment="x")


def test_a_missing_library_warns_with_the_install_command(trainer, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as if it were not installed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert added(trainer.config(report_to=["wandb", "trackio"])) == [TrackioTracker]
        assert added(trainer.config(report_to=["all"])) == [MLflowTracker, TrackioTracker]  # all: only what is there
    (message,) = [str(w.message) for w in record if issubclass(w.category, TrackerWarning)]
    assert "report_to names 'wandb', but the wandb library is not installed" in message
    assert "pip install 'posttrain-trackers[wandb]'" in message


def test_a_missing_library_warns_on_the_main_process_only(trainer, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert added(trainer.config(report_to=["wandb"])) == []
    assert not [w for w in record if issubclass(w.category, TrackerWarning)]


def test_tracker_options_are_saved_with_the_run_and_load_again(trainer, tmp_path):
    config = trainer.config(report_to=["wandb", "mlflow"], tracker_options={"wandb": {"project": "p", "tags": ["a"]}})
    save_config(config, tmp_path / "saved.yaml", "toy")
    again = load_config(type(config), tmp_path / "saved.yaml")
    assert again.tracker_options == {"wandb": {"project": "p", "tags": ["a"]}}
    assert again.report_to == ["wandb", "mlflow"]


def test_command_line_forms(trainer):
    """`--report_to wandb,mlflow` and `--tracker_options '{wandb: {project: p}}'` as `posttrain train` reads them."""
    config = load_config(
        type(trainer.config()),
        overrides={"report_to": "wandb,mlflow", "tracker_options": "{wandb: {project: p, tags: [a, b]}}"},
    )
    assert config.report_to == ["wandb", "mlflow"]
    assert config.tracker_options == {"wandb": {"project": "p", "tags": ["a", "b"]}}
    with pytest.raises(ConfigError, match="tracker_options.wandb must be a mapping"):
        load_config(type(config), overrides={"tracker_options": "{wandb: offline}"})


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_info_lists_each_trackers_options(name, capsys):
    """`posttrain info wandb` documents the tracker's typed options, read from the options class itself."""
    from posttrain.cli import main

    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert f"hook plugin: {name}" in out and "package:  posttrain-trackers" in out
    assert f"tracker_options: {{{name}: {{...}}}}" in out
    for field_name in ("run_name", "log_checkpoints"):
        assert any(line.strip().startswith(field_name) for line in out.splitlines()), field_name
