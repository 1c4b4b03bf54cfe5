"""Keep every run's files safe: one run per output directory, consistent advice, atomic final save.

What a run directory can be in (:func:`describe`), and the one piece of advice each state gets, whichever
command notices it (a refused start, ``--resume_from_checkpoint latest``, a crash, an interrupt, a full disk):

=============  ==========================================  ============================================
state          on disk                                      advice
=============  ==========================================  ============================================
``empty``      nothing of a run                             start a run
``finished``   ``run_complete.json`` (written last)         another ``--output_dir``, or overwrite it
``resumable``  at least one complete ``checkpoint-*``       ``--resume_from_checkpoint latest``
``unsaved``    config/metrics but no checkpoint             ``--overwrite_output_dir true`` (nothing to resume)
=============  ==========================================  ============================================

A lock file (:data:`LOCK_FILE`, holding the PID, host and start time of its run) refuses a second run on
the same directory; a lock left by a process that no longer runs is taken over with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from posttrain import _checkpoint as ckpt
from posttrain._errors import PosttrainError

LOCK_FILE = ".posttrain.lock"
COMPLETE_FILE = "run_complete.json"
RUN_FILES = ("posttrain_config.yaml", "provenance.json", "metrics.jsonl", COMPLETE_FILE)
#: What save_pretrained writes for a model and tokenizer; removed by --overwrite_output_dir only in a directory
#: that holds a posttrain run and whose completion record does not list its files (runs of older versions).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class RunWriteError(PosttrainError, OSError):
    """A file of the run could not be written (full disk, quota, permissions, read-only file system)."""


# -- what a directory holds ----------------------------------------------------------------------------------


class RunState:
    def __init__(self, kind: str, output_dir: Path, step: int | None = None, checkpoint: Path | None = None):
        self.kind, self.output_dir, self.step, self.checkpoint = kind, output_dir, step, checkpoint

    def __repr__(self) -> str:
        return f"RunState({self.kind!r}, step={self.step}, checkpoint={self.checkpoint})"


def describe(output_dir: str | Path) -> RunState:
    """Whether ``output_dir`` holds nothing, a finished run, a resumable one, or one that stopped unsaved."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return RunState("empty", output_dir)
    newest = ckpt.latest_checkpoint(output_dir)
    record = read_completion(output_dir)
    if record is not None:
        return RunState("finished", output_dir, record.get("global_step"), newest)
    if newest is not None:
        return RunState("resumable", output_dir, int(newest.name.split("-")[1]), newest)
    if any((output_dir / name).exists() for name in RUN_FILES):
        return RunState("unsaved", output_dir)
    return RunState("empty", output_dir)


def read_completion(output_dir: Path) -> dict | None:
    try:
        record = json.loads((output_dir / COMPLETE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def advice(output_dir: str | Path) -> str:
    """What to do next with the run in ``output_dir`` after it stopped (one sentence, consistent everywhere)."""
    newest = ckpt.latest_checkpoint(output_dir)
    if newest is not None:
        return (
            f"The last good checkpoint, {newest}, is kept: continue from it with the same command plus "
            "--resume_from_checkpoint latest."
        )
    return (
        f"No checkpoint was written in {output_dir}, so there is nothing to resume: run the same command with "
        "--overwrite_output_dir true to start again."
    )


def refuse_existing(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """A new run in a directory that holds another run is refused, each state with its own way out."""
    if resuming or overwrite:
        return
    state = describe(output_dir)
    where = f"output_dir {str(output_dir)!r} already holds"
    other = "or choose another --output_dir"
    if state.kind == "finished":
        raise PosttrainError(
            f"{where} a finished run ({state.step} steps). A new run there would replace its model: pass "
            f"--overwrite_output_dir true to delete it and start again, {other}."
        )
    if state.kind == "resumable":
        raise PosttrainError(
            f"{where} an unfinished run (newest checkpoint {state.checkpoint.name}). Pass --resume_from_checkpoint "
            f"latest to continue it, --overwrite_output_dir true to delete it and start again, {other}."
        )
    if state.kind == "unsaved":
        raise PosttrainError(
            f"{where} a run that stopped before its first checkpoint, so it cannot be resumed. Pass "
            f"--overwrite_output_dir true to delete it and start again, {other}."
        )


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint; when there is none, advice that matches the directory."""
    if value and str(value).lower() in ("latest", "true", "yes", "1") and ckpt.latest_checkpoint(output_dir) is None:
        state = describe(output_dir)
        head = f"--resume_from_checkpoint latest, but {output_dir} holds no complete checkpoint"
        if state.kind == "unsaved":
            raise PosttrainError(
                f"{head}: the run there stopped before its first save. Replace --resume_from_checkpoint latest with "
                "--overwrite_output_dir true to start it again."
            )
        if state.kind == "finished":
            raise PosttrainError(
                f"{head}: the run there finished ({state.step} steps) without intermediate checkpoints (save_steps "
                "0). To train its model further, start a new run with --model pointing at it and another --output_dir."
            )
        raise PosttrainError(
            f"{head} (nothing has run there). Drop --resume_from_checkpoint to start a new run, or set --output_dir "
            "to the run to continue."
        )
    return ckpt.resolve_resume_path(value, output_dir)


# -- before the model loads -------------------------------------------------------------------------------------


def check_output_dir_usable(output_dir: Path, model: str | None) -> None:
    """A file in the way, a directory that cannot be created or written, or the model's own directory."""
    if output_dir.exists() and not output_dir.is_dir():
        raise PosttrainError(
            f"output_dir {str(output_dir)!r} is a file, not a directory; choose another --output_dir or move the file."
        )
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PosttrainError(
            f"output_dir {str(output_dir)!r} cannot be created: {str(existing)!r} is a file, not a directory. "
            "Choose another --output_dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PosttrainError(
            f"output_dir {str(output_dir)!r} cannot be written: {str(existing)!r} is not writable by this user (or is "
            "on a read-only file system). Choose a writable --output_dir or fix the permissions."
        )
    if model and Path(model).expanduser().is_dir() and output_dir.exists():
        if Path(model).expanduser().resolve() == output_dir.resolve():
            raise PosttrainError(
                f"output_dir {str(output_dir)!r} is the model directory given as --model; the final save would "
                "overwrite the model being trained. Choose another --output_dir."
            )


def claim(config: Any, method_name: str | None, main: bool) -> tuple[Path | None, RunLock | None]:
    """Before any model loads: the directory is usable, resuming is consistent with it and with the saved
    configuration, and (on the main process) the directory is locked. Returns the checkpoint and the lock."""
    from posttrain import _resume
    from posttrain._errors import ConfigError

    output_dir = Path(config.output_dir)
    check_output_dir_usable(output_dir, config.model)
    resume_path = resolve_resume(config.resume_from_checkpoint, output_dir)
    if resume_path is not None and config.overwrite_output_dir and resume_path.parent.resolve() == output_dir.resolve():
        raise ConfigError(
            "overwrite_output_dir and resume_from_checkpoint are both set: overwriting would delete the checkpoint to "
            "resume from. Pass --resume_from_checkpoint latest to continue the run, or --overwrite_output_dir true "
            "alone to start again"
        )
    refuse_existing(output_dir, config.overwrite_output_dir, resuming=resume_path is not None)
    if resume_path is not None:
        _resume.check(config, resume_path, method_name)
    lock = RunLock(output_dir) if main else None
    if lock is not None:
        lock.acquire()
    return resume_path, lock


def open_directory(output_dir: Path, overwrite: bool) -> None:
    """Once set-up succeeded: create the directory, delete the old run when overwriting, and drop the completion
    record (a resumed run is unfinished until its final save)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        removed = clear_previous_run(output_dir)
        if removed:
            print(f"overwrite_output_dir: removed the previous run in {output_dir}: {', '.join(removed)}")
    (output_dir / COMPLETE_FILE).unlink(missing_ok=True)


# -- one run per directory --------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused PID is not mistaken for the lock's owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """``output_dir/.posttrain.lock``: created exclusively, removed when the run ends (any way but SIGKILL)."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.path = output_dir, output_dir / LOCK_FILE
        self.held, self.created_dir = False, False

    def acquire(self) -> None:
        if not self.output_dir.exists():
            self.output_dir.mkdir(parents=True)
            self.created_dir = True
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _start_time(os.getpid()),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self.held = True
            return
        raise PosttrainError(f"could not lock {self.path}: another run keeps taking it. Try again.")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid, holder.get("proc_start")):
            warnings.warn(
                f"{self.path} was left by run PID {pid} (started {holder.get('started')}), which is no longer "
                "running; taking it over.",
                RuntimeWarning,
                stacklevel=4,
            )
            self.path.unlink(missing_ok=True)
            return
        who = f"PID {pid} on host {host}" if pid else "an unknown process"
        raise PosttrainError(
            f"output_dir {str(self.output_dir)!r} is in use by another run ({who}, since {holder.get('started', '?')}); "
            "two runs in one directory would mix their checkpoints and metrics. Wait for it to end, choose another "
            f"--output_dir, or, if that run is dead (e.g. on another machine), delete {self.path}."
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_dir:  # a run refused during set-up leaves nothing behind
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()  # only when empty


def clear_previous_run(output_dir: Path) -> list[str]:
    """``--overwrite_output_dir true``: delete the old run's checkpoints, metrics, config and model, so nothing
    of it can be resumed or mistaken for this run's. Returns what was removed."""
    state = describe(output_dir)
    if state.kind == "empty":
        return []
    removed = []
    record = read_completion(output_dir) or {}
    names = set(RUN_FILES) | {"runs"} | set(record.get("files") or MODEL_FILES)
    for child in sorted(output_dir.iterdir()):
        doomed = child.name in names or child.name.startswith(("checkpoint-", ".tmp-checkpoint-", ".tmp-final"))
        doomed = doomed or (child.name.startswith("model-") and child.name.endswith(".safetensors"))
        if doomed and child.name != LOCK_FILE:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child.name)
    return removed


# -- writing -------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def writing(what: str, output_dir: Path, kept: str = ""):
    """Turn any failure to write ``what`` (OSError, or an error raised by safetensors, tokenizers, torch.save)
    into a one-line :class:`RunWriteError` with the advice for ``output_dir``."""
    try:
        yield
    except PosttrainError:
        raise
    except Exception as exc:
        error = RunWriteError(
            f"could not write {what}: {_reason(exc)}. {kept}Free disk space or fix the permissions, then: "
            f"{advice(output_dir)}"
        )
        error.errno = getattr(exc, "errno", None)
        raise error from exc


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_final(output_dir: Path, model: Any, tokenizer: Any, step: int) -> None:
    """The final model, atomically: ``save_pretrained`` into ``.tmp-final``, fsync, move the files into place
    (``config.json`` last, so the directory never looks like a model before its weights are there), then write
    :data:`COMPLETE_FILE`, the record that the run finished."""
    tmp = output_dir / ".tmp-final"
    kept = "The checkpoints are kept and no partial model was left. "
    with writing(f"the final model into {output_dir}", output_dir, kept):
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            files = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: (p.name == "config.json", p.name))
            for file in files:
                _fsync(file)
            for file in files:
                os.replace(file, output_dir / file.name)
            _fsync(output_dir)
            record = {
                "global_step": step,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": [p.name for p in files],
            }
            part = output_dir / (COMPLETE_FILE + ".tmp")
            part.write_text(json.dumps(record, indent=2))
            os.replace(part, output_dir / COMPLETE_FILE)
            _fsync(output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
