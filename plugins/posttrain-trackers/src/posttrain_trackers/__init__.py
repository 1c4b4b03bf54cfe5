"""Experiment trackers for posttrain: Weights & Biases, MLflow and Trackio, activated by ``report_to``.

Each tracker is a ``posttrain.plugins`` entry point (a module with a ``posttrain_add_callbacks`` hook) whose name is
its ``report_to`` name. With the Python API, pass them yourself::

    from posttrain_trackers import trackers_for
    train(method, config, callbacks=trackers_for(config))   # what report_to and tracker_options ask for
"""

from __future__ import annotations

from typing import Any

from posttrain_trackers.mlflow import MLflowOptions, MLflowTracker
from posttrain_trackers.tracker import Tracker, TrackerOptions, TrackerWarning, tracker_for
from posttrain_trackers.trackio import TrackioOptions, TrackioTracker
from posttrain_trackers.wandb import WandbOptions, WandbTracker

__all__ = [
    "TRACKERS",
    "MLflowOptions",
    "MLflowTracker",
    "Tracker",
    "TrackerOptions",
    "TrackerWarning",
    "TrackioOptions",
    "TrackioTracker",
    "WandbOptions",
    "WandbTracker",
    "tracker_for",
    "trackers_for",
]

TRACKERS: tuple[type[Tracker], ...] = (WandbTracker, MLflowTracker, TrackioTracker)


def trackers_for(config: Any) -> list[Tracker]:
    """The trackers a run's ``report_to`` names (``all``: every one whose library is installed), with their options
    from ``tracker_options``; what the ``posttrain_add_callbacks`` hooks add when training from the command line."""
    return [t for t in (tracker_for(cls, config) for cls in TRACKERS) if t is not None]
