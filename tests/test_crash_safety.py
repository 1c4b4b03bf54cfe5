"""Crash safety: ``kill -9`` a real ``posttrain train`` at random moments, half of them inside a checkpoint write.

Whatever the moment, the output directory holds only complete ``checkpoint-*`` directories (plus, at most,
a hidden ``.tmp-checkpoint-*`` being written), ``latest`` picks the newest complete one, and resuming from it
reaches bitwise the weights of an uninterrupted run. The next save removes the leftover temporary directory.

The moments are events, not times: the run kills itself (SIGKILL, which nothing can catch) at a randomly chosen
loss call, or at a randomly chosen ``torch.save`` into a temporary checkpoint directory after writing a random
prefix of that file's bytes. So every kill lands where it was meant to, however loaded the machine is.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from posttrain._checkpoint import STATE_FILE, latest_checkpoint
from posttrain._run_guard import COMPLETE_FILE
from posttrain.cli import main

#: Test hooks appended to the toy method. ``CRASH_KILL_AT=loss:N`` kills the process at its N-th loss call (mid
#: step); ``CRASH_KILL_AT=save:N:F`` kills it at its N-th ``torch.save`` into a ``.tmp-checkpoint-*`` directory,
#: after writing the first fraction F of that file's bytes (a file cut short mid-write; F = 1 lands between files).
HOOKS = """
import io as _io
import os as _os
import signal as _signal

_KILL_AT = _os.environ.get("CRASH_KILL_AT", "").split(":")
_seen = {"loss": 0, "save": 0}


def _die():
    _os.kill(_os.getpid(), _signal.SIGKILL)


_plain_loss = Toy.loss


def _loss_or_die(self, model, batch, ctx):
    _seen["loss"] += 1
    if _KILL_AT[0] == "loss" and _seen["loss"] == int(_KILL_AT[1]):
        _die()
    return _plain_loss(self, model, batch, ctx)


Toy.loss = _loss_or_die
if _KILL_AT[0] == "save":
    _plain_save = torch.save

    def _save_or_die(obj, target, *args, **kwargs):
        if ".tmp-checkpoint-" in str(target):
            _seen["save"] += 1
            if _seen["save"] == int(_KILL_AT[1]):
                buffer = _io.BytesIO()
                _plain_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(target, "wb") as fh:
                    fh.write(data[: int(len(data) * float(_KILL_AT[2]))])
                    fh.flush()
                _die()
        return _plain_save(obj, target, *args, **kwargs)

    torch.save = _save_or_die
"""

STEPS = 8
TRIALS = 10


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def train_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train",
        "crashtoy",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--save_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--disable_progress_bar",
    ]


def kill_at(args: list[str], event: str) -> None:
    """Run ``posttrain ARGS`` in a subprocess that kills itself (SIGKILL) at ``event`` (see HOOKS)."""
    env = {**os.environ, "CRASH_KILL_AT": event, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=900,  # a hang guard only; nothing here depends on how long the run takes
    )
    assert done.returncode == -9, f"{event}: the run was not killed there (exit {done.returncode}): {done.stderr}"


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_to_the_same_weights(
    fake_site, toy_method_source, tiny_model_dir, tmp_path, one_torch_thread
):
    """Exact comparison: a resumed run repeats the uninterrupted run's arithmetic in the same order, as long as every
    run uses one torch thread (the killed runs are subprocesses with OMP_NUM_THREADS=1; the fixture pins the
    in-process reference and resumes to the same)."""
    fake_site.add(
        "posttrain-crashtoy",
        methods={"crashtoy": "pt_crashtoy:Toy"},
        module="pt_crashtoy",
        code=toy_method_source + HOOKS,
    )
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": "abc " * (1 + i % 5) + str(i)}) + "\n" for i in range(16)))
    reference = tmp_path / "reference"
    saves = []  # every torch.save into a temporary checkpoint directory: the events a save kill picks from
    plain_save = torch.save

    def counting_save(obj, target, *args, **kwargs):
        saves.extend([str(target)] if ".tmp-checkpoint-" in str(target) else [])
        return plain_save(obj, target, *args, **kwargs)

    torch.save = counting_save
    try:
        assert main(train_args(tiny_model_dir, data, reference)) == 0
    finally:
        torch.save = plain_save
    assert len(saves) >= STEPS, saves  # a checkpoint every step but the last (which ends in the final save)
    expected = weights(reference)

    rng = random.Random(20240607)
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        in_write = trial % 2 == 1
        if in_write:
            event = f"save:{rng.randint(1, len(saves))}:{rng.choice([0.0, rng.random(), 1.0])}"
        else:
            event = f"loss:{rng.randint(1, STEPS)}"
        kill_at(train_args(tiny_model_dir, data, out), event)

        leftovers = sorted(p.name for p in out.glob(".tmp-checkpoint-*"))
        assert bool(leftovers) == in_write, f"trial {trial} ({event}): temporary checkpoints {leftovers}"
        visible = [p for p in out.glob("checkpoint-*")]
        assert all((p / STATE_FILE).is_file() for p in visible), f"trial {trial}: a partial checkpoint is visible"
        latest = latest_checkpoint(out)
        assert latest is None or latest.name.startswith("checkpoint-"), f"trial {trial}: {latest}"
        assert not (out / COMPLETE_FILE).exists(), f"trial {trial} ({event}): a killed run is marked complete"

        resume = ["--resume_from_checkpoint", "latest"] if latest else ["--overwrite_output_dir", "true"]
        assert main([*train_args(tiny_model_dir, data, out), *resume]) == 0, f"trial {trial} ({event}, {leftovers})"
        got = weights(out)
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst == 0.0, f"trial {trial} ({event}): resumed from {latest} differs by {worst}"
        assert not list(out.glob(".tmp-checkpoint-*")), f"trial {trial}: the next save did not clean {leftovers}"


def test_leftover_temporary_checkpoint_is_ignored_by_latest_and_removed_by_next_save(runner, toy_rows):
    """A ``.tmp-checkpoint-*`` from a killed run (complete-looking or not) never counts as a checkpoint."""
    runner.train(toy_rows, "left", max_steps=2, save_steps=1)
    out = runner.tmp / "left"
    fake = out / ".tmp-checkpoint-9"
    fake.mkdir()
    (fake / STATE_FILE).write_text(json.dumps({"global_step": 9}))
    (out / ".tmp-checkpoint-5").mkdir()
    assert latest_checkpoint(out).name == "checkpoint-1"
    runner.train(
        toy_rows, "left", max_steps=3, save_steps=1, resume_from_checkpoint="latest", resume_override=["max_steps"]
    )
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert latest_checkpoint(out).name == "checkpoint-2"
