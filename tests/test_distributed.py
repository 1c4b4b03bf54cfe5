"""Two CPU processes (gloo, launched by torchrun) == one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import posttrain_ddp_toy as toy
from posttrain.loop import train
rows = [{"text": ("abc " * (1 + i % 7)) + str(i)} for i in range(32)]
config = toy.ToyConfig(model=sys.argv[2], output_dir=sys.argv[3], max_steps=3, learning_rate=1e-3,
                       per_device_train_batch_size=int(sys.argv[4]), gradient_accumulation_steps=2,
                       logging_steps=1, disable_progress_bar=True, seed=0, save_steps=2,
                       group_by_length=sys.argv[5:] == ["group"])
result = train(toy.Toy(), config, train_dataset=rows)
if result.output_dir and int(__import__("os").environ.get("RANK", "0")) == 0:
    open(sys.argv[3] + "/losses.json", "w").write(json.dumps([r["loss"] for r in result.log_history]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("order", ["random", "group"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, toy_method_source, order):
    """Also with group_by_length: each process takes its share of the same length-grouped micro-batches."""
    (tmp_path / "posttrain_ddp_toy.py").write_text(toy_method_source)
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "run.py"),
            str(tmp_path),
            str(tiny_model_dir),
            str(tmp_path / "one"),
            "4",
            order,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(tmp_path / "run.py"),
            str(tmp_path),
            str(tiny_model_dir),
            str(tmp_path / "two"),
            "2",
            order,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    losses_one = json.loads((tmp_path / "one" / "losses.json").read_text())
    losses_two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # each process wrote its own RNG state into the shared checkpoint
    assert {p.name for p in (tmp_path / "two" / "checkpoint-2").glob("rng_state_*.pt")} == {
        "rng_state_0.pt",
        "rng_state_1.pt",
    }
