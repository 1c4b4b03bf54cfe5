"""Bad input, class "nothing lost": preemption (SIGTERM, Ctrl-C, kill -9), a full disk at every kind of write,
a NaN loss. Whatever stops a run, the last good checkpoint survives, no partial file looks complete, and the
advice printed is the one that works next (never a loop of contradictory advice)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_input_catalogue import LM, SLOW_TOY, assert_said, cli, jsonl, same_weights, snapshot, subprocess_env

#: The toy sends itself a signal (in-process: the loop's handler sees it exactly as one from outside).
SIGNAL_TOY = """
import os as _os
import signal as _signal

_plain_loss_for_signal = Toy.loss


def _signalling_loss(self, model, batch, ctx):
    at = int(_os.environ.get("TOY_SIGNAL_AT_STEP", "-1"))
    if ctx.step == at and ctx.micro_step == 0 and not getattr(Toy, "_signalled", False):
        Toy._signalled = True
        _os.kill(_os.getpid(), getattr(_signal, _os.environ.get("TOY_SIGNAL", "SIGTERM")))
    return _plain_loss_for_signal(self, model, batch, ctx)


Toy.loss = _signalling_loss
"""


@pytest.fixture
def toy(fake_site, toy_method_source):
    """The toy LM method installed as posttrain-ptoy, slowed by TOY_STEP_DELAY, signalling at TOY_SIGNAL_AT_STEP."""
    fake_site.add(
        "posttrain-ptoy",
        methods={"ptoy": "pt_ptoy:Toy"},
        module="pt_ptoy",
        code=toy_method_source + SLOW_TOY + SIGNAL_TOY,
    )
    return fake_site


def args(paths, out="out", *extra) -> list[str]:
    data = paths["tmp"] / "lm.jsonl"
    if not data.exists():
        data.write_text(jsonl(LM * 4))
    return ["train", "ptoy", "--model", str(paths["model"]), "--dataset", str(data), "--output_dir",
            str(paths["tmp"] / out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--disable_progress_bar", "--logging_steps", "1", *map(str, extra)]  # fmt: skip


def start(paths, *extra, delay="0.1") -> subprocess.Popen:
    env = subprocess_env(TOY_STEP_DELAY=delay)
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain", *args(paths, "out", *extra)[0:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_steps(paths, proc, steps: int) -> None:
    metrics = paths["tmp"] / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}: {proc.poll()}")


# -- signals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_resumable_checkpoint(sig, code, toy, paths):
    """A real ``posttrain train`` gets SIGTERM (a scheduler's preemption) or Ctrl-C: it finishes the step, writes
    a complete checkpoint, exits 128 + the signal, says how to resume, and resuming equals an uninterrupted run."""
    proc = start(paths, "--max_steps", "40")
    wait_for_steps(paths, proc, 2)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    out = paths["tmp"] / "out"
    (checkpoint,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 40 and checkpoint.name == f"checkpoint-{step}"
    assert f"interrupted at step {step} ({sig.name}); resumable checkpoint in {checkpoint}" in output
    assert "--resume_from_checkpoint latest" in output and "Traceback" not in output
    assert not (out / "run_complete.json").exists() and not (out / ".posttrain.lock").exists()
    assert cli(*args(paths, "out", "--max_steps", "40", "--resume_from_checkpoint", "latest")).code == 0
    assert (out / "run_complete.json").is_file()
    assert cli(*args(paths, "reference", "--max_steps", "40")).code == 0
    assert same_weights(out, paths["tmp"] / "reference")


def follow(paths, *extra):
    outcome = cli(*args(paths, "out", *extra))
    assert "Traceback" not in outcome.err
    return outcome


def test_killed_before_its_first_checkpoint_the_advice_leads_out(toy, paths):
    """kill -9 before any checkpoint: every message points to --overwrite_output_dir, none to resuming, and
    following it works (the dead run's lock is taken over)."""
    proc = start(paths, "--max_steps", "40", "--save_steps", "0")
    wait_for_steps(paths, proc, 1)
    proc.kill()
    proc.wait(timeout=60)
    same = ["--max_steps", "3", "--save_steps", "0"]
    again = follow(paths, *same)
    assert_said(again, 2, ["stopped before its first checkpoint", "cannot be resumed"], ["--overwrite_output_dir true"])
    resumed = follow(paths, *same, "--resume_from_checkpoint", "latest")
    assert_said(resumed, 2, ["stopped before its first save"], ["with --overwrite_output_dir true"])
    for outcome in (again, resumed):
        assert "Pass --resume_from_checkpoint latest" not in outcome.err
    done = follow(paths, *same, "--overwrite_output_dir", "true")
    assert done.code == 0, done.err
    assert "no longer running; taking it over" in done.err


def test_interrupt_without_saving_before_any_checkpoint(toy, paths, monkeypatch):
    monkeypatch.setenv("TOY_SIGNAL_AT_STEP", "1")
    monkeypatch.setenv("TOY_SIGNAL", "SIGINT")
    outcome = follow(paths, "--max_steps", "4", "--save_steps", "0", "--save_on_interrupt", "false")
    assert outcome.code == 130, outcome.err
    said = outcome.out + outcome.err
    assert "save_on_interrupt is false, so nothing was saved" in said
    assert "No checkpoint was written" in said and "--overwrite_output_dir true to start again" in said
    monkeypatch.delenv("TOY_SIGNAL_AT_STEP")
    assert follow(paths, "--max_steps", "4", "--save_steps", "0", "--overwrite_output_dir", "true").code == 0


def test_interrupt_without_saving_after_a_checkpoint(toy, paths, monkeypatch):
    monkeypatch.setenv("TOY_SIGNAL_AT_STEP", "2")  # during step 3: the newest checkpoint is checkpoint-2
    monkeypatch.setenv("TOY_SIGNAL", "SIGTERM")
    outcome = follow(paths, "--max_steps", "6", "--save_steps", "2", "--save_on_interrupt", "false")
    assert outcome.code == 143, outcome.err
    said = outcome.out + outcome.err
    checkpoint = paths["tmp"] / "out" / "checkpoint-2"
    assert f"The last good checkpoint, {checkpoint}, is kept" in said and "--resume_from_checkpoint latest" in said
    monkeypatch.delenv("TOY_SIGNAL_AT_STEP")
    resumed = follow(paths, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.code == 0, resumed.err


def test_nan_loss_names_step_and_rows_and_keeps_last_checkpoint(toy, paths):
    out = paths["tmp"] / "out"
    outcome = follow(paths, "--max_steps", "4", "--save_steps", "2", "--nan_at_step", "2")
    assert_said(
        outcome,
        2,
        ["loss is nan at step 3", "rows of the batch on process 0: ["],
        ["Lower learning_rate, check those rows", f"The last good checkpoint, {out}/checkpoint-2, is kept"],
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    # the fix (here: no more NaN) is a change of configuration, so the resumed run names it
    fixed = ["--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest"]
    assert follow(paths, *fixed, "--resume_override", "nan_at_step").code == 0
    assert follow(paths, "--max_steps", "4", "--save_steps", "2", "--output_dir", paths["tmp"] / "ref").code == 0
    assert same_weights(out, paths["tmp"] / "ref")


def test_nan_loss_before_any_checkpoint_says_start_again(toy, paths):
    outcome = follow(paths, "--max_steps", "4", "--save_steps", "2", "--nan_at_step", "0")
    assert_said(outcome, 2, ["loss is nan at step 1"], ["No checkpoint was written", "--overwrite_output_dir true"])
    assert follow(paths, "--max_steps", "4", "--save_steps", "2", "--overwrite_output_dir", "true").code == 0


# -- a full disk (or any failing write) at each kind of write -------------------------------------------------------

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _inject(monkeypatch, where: str, when) -> None:
    """Make one kind of write fail when ``when(path)`` is true for the file or directory it writes."""
    import pathlib

    import torch
    import transformers.modeling_utils as modeling
    from posttrain import _tracking
    from safetensors import SafetensorError
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if where == "torch.save":
        real = torch.save

        def fake(obj, target, *a, **k):
            if when(Path(target)):
                raise RuntimeError("[enforce fail at inline_container.cc:664] PytorchStreamWriter failed writing file")
            return real(obj, target, *a, **k)

        monkeypatch.setattr(torch, "save", fake)
    elif where == "torch.save ENOSPC":
        real_save = torch.save

        def fake_save(obj, target, *a, **k):
            if when(Path(target)):
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
            return real_save(obj, target, *a, **k)

        monkeypatch.setattr(torch, "save", fake_save)
    elif where == "safetensors":
        real_st = modeling.safe_save_file

        def fake_st(tensors, filename, *a, **k):
            if when(Path(filename)):
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
            return real_st(tensors, filename, *a, **k)

        monkeypatch.setattr(modeling, "safe_save_file", fake_st)
    elif where == "tokenizers":
        real_tok = TokenizersBackend._save_pretrained

        def fake_tok(self, save_directory, *a, **k):
            if when(Path(save_directory)):
                raise Exception("No space left on device (os error 28)")
            return real_tok(self, save_directory, *a, **k)

        monkeypatch.setattr(TokenizersBackend, "_save_pretrained", fake_tok)
    elif where == "write_text":
        real_write = pathlib.Path.write_text

        def fake_write(self, *a, **k):
            if when(self):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_write(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "write_text", fake_write)
    elif where == "os.replace":
        real_replace = os.replace

        def fake_replace(src, dst, *a, **k):
            if when(Path(src)):
                raise OSError(errno.EIO, "Input/output error", str(src))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", fake_replace)
    elif where == "metrics":

        def fake_open(file, mode="r", *a, **k):
            if "a" in mode and when(Path(file)):
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return open(file, mode, *a, **k)

        monkeypatch.setattr(_tracking, "open", fake_open, raising=False)


def in_ckpt4(name: str = ""):
    return lambda p: ".tmp-checkpoint-4" in str(p) and (not name or p.name == name)


def in_final(name: str = ""):
    return lambda p: ".tmp-final" in str(p) and (not name or p.name == name)


#: id -> (what fails, when, what the message names, whether checkpoint-2 is the one kept)
WRITES = {
    "checkpoint-optimizer-ENOSPC": ("torch.save ENOSPC", in_ckpt4("optimizer.pt"), "No space left on device"),
    "checkpoint-rng-state-torch-error": ("torch.save", in_ckpt4("rng_state_0.pt"), "PytorchStreamWriter failed"),
    "checkpoint-weights-safetensors-error": ("safetensors", in_ckpt4(), "SafetensorError: Error while serializing"),
    "checkpoint-tokenizer-tokenizers-error": ("tokenizers", in_ckpt4(), "Exception: No space left on device"),
    "checkpoint-trainer-state": ("write_text", in_ckpt4("trainer_state.json"), "No space left on device"),
    "checkpoint-rename-into-place": ("os.replace", lambda p: p.name == ".tmp-checkpoint-4", "Input/output error"),
    "final-weights-safetensors-error": ("safetensors", in_final(), "SafetensorError: Error while serializing"),
    "final-tokenizer-tokenizers-error": ("tokenizers", in_final(), "Exception: No space left on device"),
    "final-move-into-place": ("os.replace", in_final("model.safetensors"), "Input/output error"),
    "metrics-jsonl": ("metrics", lambda p: p.name == "metrics.jsonl", "No space left on device"),
}


@pytest.mark.parametrize("failing", sorted(WRITES))
def test_failed_write_keeps_the_last_good_checkpoint(failing, toy, paths):
    where, when, cause = WRITES[failing]
    out = paths["tmp"] / "out"
    kept = {}
    import torch

    flags = ["--max_steps", "6", "--save_steps", "2", "--logging_steps", "6"]
    with pytest.MonkeyPatch.context() as patch:  # undone before resuming (fake_site's own patches stay)
        _inject(patch, where, when)
        inner = torch.save

        def watch(obj, target, *a, **k):  # remember checkpoint-2 as it was once complete
            if ".tmp-checkpoint-4" in str(target) and not kept:
                kept.update(snapshot(out / "checkpoint-2"))
            return inner(obj, target, *a, **k)

        patch.setattr(torch, "save", watch)
        outcome = follow(paths, *flags)
    final = failing.startswith("final")
    what = "the final model into" if final else "metrics.jsonl" if failing == "metrics-jsonl" else "checkpoint-4"
    newest = out / ("checkpoint-2" if what == "checkpoint-4" else "checkpoint-4")
    assert_said(
        outcome,
        2,
        [f"could not write {what}", cause],
        ["Free disk space", f"The last good checkpoint, {newest}, is kept", "--resume_from_checkpoint latest"],
    )
    assert outcome.err.count("\n") <= 2, "a write error is one line (plus warnings)"
    visible = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name or p.name.startswith(".tmp"))
    assert visible == (["checkpoint-2"] if what == "checkpoint-4" else ["checkpoint-2", "checkpoint-4"])
    assert snapshot(out / "checkpoint-2") == kept
    assert not (out / "run_complete.json").exists(), "a failed run looks finished"
    assert not (out / "config.json").exists() or not final, "a failed final save left a loadable-looking model"
    assert not (out / ".posttrain.lock").exists()
    resumed = follow(paths, *flags, "--resume_from_checkpoint", "latest")
    assert resumed.code == 0, resumed.err
    assert (out / "run_complete.json").is_file()


def test_failed_write_of_the_run_config_leaves_nothing(toy, paths):
    with pytest.MonkeyPatch.context() as patch:
        _inject(patch, "write_text", lambda p: p.name == "posttrain_config.yaml.tmp")
        outcome = follow(paths, "--max_steps", "2")
    assert_said(outcome, 2, ["could not write the run's files", "No space left on device"], ["Free disk space"])
    assert not (paths["tmp"] / "out").exists() or not any((paths["tmp"] / "out").iterdir())
