"""Two CPU processes (gloo, under torchrun): every process builds its trackers from the config, only the main one
logs, and the tracker holds exactly the rows of metrics.jsonl."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("trackio", reason="trackio is not installed: pip install 'posttrain-trackers[trackio]'")

from trackio.sqlite_storage import SQLiteStorage

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import posttrain_trackers_ddp_toy as toy
from posttrain.loop import train
from posttrain_trackers import trackers_for

config = toy.ToyConfig(model=sys.argv[2], output_dir=sys.argv[3], max_steps=3, learning_rate=1e-3, logging_steps=1,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, disable_progress_bar=True,
                       save_steps=0, seed=0, report_to=["trackio"],
                       tracker_options={"trackio": {"project": "pt-ddp", "run_name": "ddp"}})
train(toy.Toy(), config, train_dataset=toy.ROWS, callbacks=trackers_for(config))  # trackers on every process
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_log_one_run_from_the_main_process(trainer, tmp_path):
    (tmp_path / "posttrain_trackers_ddp_toy.py").write_text(trainer.toy_source)
    (tmp_path / "run.py").write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(tmp_path / "run.py"), str(tmp_path)]
    command += [str(trainer.model_dir), str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # TRACKIO_DIR comes from conftest
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TrackerWarning" not in done.stderr
    assert done.stdout.count("* Created new run: ddp") == 1  # one process opened a Trackio run
    assert SQLiteStorage.get_runs("pt-ddp") == ["ddp"]
    points: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs("pt-ddp", "ddp"):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                points.setdefault(key, {})[row["step"]] = value
    assert points == trainer.expected_points(tmp_path / "ddp")
    assert sorted(points["loss"]) == [1, 2, 3]
