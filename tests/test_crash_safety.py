"""Crash safety: ``kill -9`` a real ``posttrain train`` at random moments, many of them inside a checkpoint write.

Whatever the moment, the output directory holds only complete ``checkpoint-*`` directories (plus, at most,
a hidden ``.tmp-checkpoint-*`` being written), ``latest`` picks the newest complete one, and resuming from it
reaches bitwise the weights of an uninterrupted run. The next save removes the leftover temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from posttrain._checkpoint import STATE_FILE, latest_checkpoint
from posttrain._run_guard import COMPLETE_FILE
from posttrain.cli import main

#: Test hooks appended to the toy method: a pause per loss call, and a pause after every torch.save into a
#: temporary checkpoint directory, so that checkpoint writes take most of a step and random kills land in them.
HOOKS = """
import os as _os
import time as _time

_STEP_DELAY = float(_os.environ.get("CRASH_STEP_DELAY", "0"))
_SAVE_DELAY = float(_os.environ.get("CRASH_SAVE_DELAY", "0"))
_plain_loss = Toy.loss


def _slow_loss(self, model, batch, ctx):
    _time.sleep(_STEP_DELAY)
    return _plain_loss(self, model, batch, ctx)


Toy.loss = _slow_loss
if _SAVE_DELAY:
    _plain_save = torch.save

    def _slow_save(obj, target, *args, **kwargs):
        _plain_save(obj, target, *args, **kwargs)
        if ".tmp-checkpoint-" in str(target):
            _time.sleep(_SAVE_DELAY)

    torch.save = _slow_save
"""

STEPS = 8
TRIALS = 10
KILL_WINDOW_S = 2.4  # a run takes about STEPS * (0.03 + 3 * 0.06) s of sleeps plus its own work


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


def kill_during_training(args: list[str], out: Path, delay: float) -> bool:
    """Start ``posttrain ARGS``; SIGKILL it ``delay`` s after its training loop starts. True if it was still running."""
    env = {**os.environ, "CRASH_STEP_DELAY": "0.03", "CRASH_SAVE_DELAY": "0.06", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "posttrain_config.yaml").is_file():  # written just before the first step
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.01)
        time.sleep(delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return alive
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_to_the_same_weights(
    fake_site, toy_method_source, tiny_model_dir, tmp_path
):
    fake_site.add(
        "posttrain-crashtoy",
        methods={"crashtoy": "pt_crashtoy:Toy"},
        module="pt_crashtoy",
        code=toy_method_source + HOOKS,
    )
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": "abc " * (1 + i % 5) + str(i)}) + "\n" for i in range(16)))
    reference = tmp_path / "reference"
    assert main(train_args(tiny_model_dir, data, reference)) == 0
    expected = weights(reference)

    rng = random.Random(20240607)
    killed_running = killed_in_write = finished_before_kill = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        killed_running += kill_during_training(
            train_args(tiny_model_dir, data, out), out, rng.uniform(0, KILL_WINDOW_S)
        )

        leftovers = sorted(p.name for p in out.glob(".tmp-checkpoint-*"))
        killed_in_write += bool(leftovers)
        visible = [p for p in out.glob("checkpoint-*")]
        assert all((p / STATE_FILE).is_file() for p in visible), f"trial {trial}: a partial checkpoint is visible"
        latest = latest_checkpoint(out)
        assert latest is None or latest.name.startswith("checkpoint-"), f"trial {trial}: {latest}"

        if (out / COMPLETE_FILE).is_file():
            # The kill landed after the run had finished (a loaded machine runs slower or faster than the
            # window assumes): a finished run refuses to train again, and its final model must already match.
            finished_before_kill += 1
        else:
            resume = ["--resume_from_checkpoint", "latest"] if latest else ["--overwrite_output_dir", "true"]
            assert main([*train_args(tiny_model_dir, data, out), *resume]) == 0, f"trial {trial} ({leftovers})"
        got = weights(out)
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, f"trial {trial}: resumed from {latest} differs by {worst}"
        assert not list(out.glob(".tmp-checkpoint-*")), f"trial {trial}: the next save did not clean {leftovers}"

    print(
        f"{TRIALS} kills: {killed_running} while running, {killed_in_write} inside a checkpoint write, "
        f"{finished_before_kill} after the run had finished"
    )
    assert killed_running >= TRIALS // 2, f"only {killed_running} of {TRIALS} kills hit a running process"
    assert killed_in_write >= 1, "no kill landed inside a checkpoint write"


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
