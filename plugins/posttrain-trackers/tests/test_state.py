"""trackers.json: what a resumed run reopens, and never a tracker run of an earlier run in the same output_dir."""

from __future__ import annotations

import json
import os

from posttrain_trackers.tracker import STATE_FILE, read_state, write_state


def test_state_merges_per_tracker_and_is_written_atomically(tmp_path):
    write_state(tmp_path, "wandb", {"run_id": "a"})
    write_state(tmp_path, "mlflow", {"run_id": "b"})
    assert read_state(tmp_path) == {"wandb": {"run_id": "a"}, "mlflow": {"run_id": "b"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left behind


def test_a_new_run_drops_what_an_earlier_run_left(tmp_path):
    write_state(tmp_path, "mlflow", {"run_id": "earlier"})
    write_state(tmp_path, "trackio", {"run_name": "earlier"})
    (tmp_path / "provenance.json").write_text("{}")  # core writes it when the next run starts
    state = tmp_path / STATE_FILE
    os.utime(state, ns=(1, 1))  # certainly older than provenance.json, whatever the clock's resolution
    write_state(tmp_path, "mlflow", {"run_id": "resumed"}, new_run=False)  # a resumed run keeps the others
    assert read_state(tmp_path) == {"mlflow": {"run_id": "resumed"}, "trackio": {"run_name": "earlier"}}
    os.utime(state, ns=(1, 1))
    write_state(tmp_path, "wandb", {"run_id": "new"}, new_run=True)
    assert json.loads(state.read_text()) == {"wandb": {"run_id": "new"}}


def test_unreadable_state_is_empty(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    assert read_state(tmp_path) == {}
