"""Atomic checkpoints and exact resume.

A checkpoint is written into a hidden temporary directory beside its final place and renamed into
``checkpoint-<step>`` only once every file is on disk, so a crash (or ``kill -9``, or a full disk)
never leaves a half-written ``checkpoint-*``: the previous good one stays the latest.

Layout (transformers-compatible: ``from_pretrained("out/checkpoint-20")`` works)::

    checkpoint-20/
        config.json, model.safetensors    # save_pretrained (adapter files with LoRA)
        tokenizer files
        optimizer.pt, scheduler.pt        # torch state dicts
        rng_state_<rank>.pt               # python, numpy, torch (and CUDA) RNG, per process
        method_state.pt                   # the method's own state, when it has one
        rollout_cache_<rank>.pt           # rolled-out batches of an unfinished batch_reuse group
        trainer_state.json                # step, epoch, metric totals; written last

Every ``.pt`` file is loaded with ``torch.load(weights_only=True)``: only tensors, numbers, strings,
lists, tuples and dicts come back, so a planted pickle payload cannot run code on resume. States are
converted to those types when saved (the numpy RNG state's array becomes a tensor).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from posttrain._errors import PosttrainError

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as weights_only-loadable values (tensors, ints, lists, strings)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path, map_location: Any = None) -> Any:
    """``torch.load`` restricted to plain data: a checkpoint file never runs code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    accelerator,
    model,
    optimizer,
    scheduler,
    tokenizer=None,
    method=None,
    state: dict | None = None,
    rollout_cache: dict | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process must call this (collective)."""
    import torch

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    main = accelerator.is_main_process
    if main:
        for stale in output_dir.glob(".tmp-checkpoint-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        if rollout_cache:
            cpu = {
                k: {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in b.items()}
                for k, b in rollout_cache.items()
            }
            torch.save(cpu, tmp / f"rollout_cache_{accelerator.process_index}.pt")
        if main:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            method_state = getattr(method, "state_dict", None) if method is not None else None
            if method_state is not None:
                torch.save(method_state(), tmp / "method_state.pt")
            # trainer_state.json last: its presence marks a complete checkpoint
            (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, **(state or {})}, indent=2))
            for file in tmp.iterdir():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        accelerator.wait_for_everyone()
        if main:
            if final.exists():  # re-saving the same step (e.g. interrupt right after a save)
                (final / STATE_FILE).unlink(missing_ok=True)  # first, so a half-deleted one never looks complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(output_dir)
    except BaseException as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, PosttrainError):
            # a full disk shows up as OSError, or as whatever safetensors, tokenizers or torch.save raise
            raise CheckpointWriteError.from_error(exc, final) from exc
        raise
    if main:
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                (old / STATE_FILE).unlink(missing_ok=True)  # first, so a half-deleted one never looks complete
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(PosttrainError, OSError):
    """Writing a checkpoint failed (full disk, quota, permissions); nothing partial was left behind."""

    @classmethod
    def from_error(cls, exc: Exception, final: Path) -> CheckpointWriteError:
        from posttrain import _run_guard

        newest = latest_checkpoint(final.parent)
        kept = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint yet"
        error = cls(
            f"could not write {final.name}: {_run_guard._reason(exc)}. The partial checkpoint was removed and "
            f"{kept}. Free disk space (or set save_total_limit), then: {_run_guard.advice(final.parent)}"
        )
        error.errno = getattr(exc, "errno", None)
        return error


def resolve_resume_path(value: str | None, output_dir: str | Path) -> Path | None:
    """``"latest"``/``"true"`` -> newest complete checkpoint in output_dir; a path -> that checkpoint."""
    if not value or str(value).lower() in ("false", "none", "no"):
        return None
    if str(value).lower() in ("latest", "true", "yes", "1"):
        path = latest_checkpoint(output_dir)
        if path is None:
            raise PosttrainError(
                f"resume_from_checkpoint=latest but {output_dir} holds no complete checkpoint-*; drop "
                "--resume_from_checkpoint to start a new run, or set --output_dir to the run to continue."
            )
        return path
    path = Path(value)
    if not path.is_dir():
        raise PosttrainError(
            f"checkpoint {str(path)!r} does not exist; pass a checkpoint-* directory, or 'latest' for the newest "
            "complete one in output_dir."
        )
    if not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path.parent)
        hint = (
            f" Resume from the newest complete checkpoint there, {newest} (or 'latest')."
            if newest
            else " No complete checkpoint is left there; start again with --overwrite_output_dir true instead of "
            "--resume_from_checkpoint."
        )
        raise PosttrainError(
            f"checkpoint {str(path)!r} is incomplete or corrupt (no {STATE_FILE}); it was probably interrupted while "
            f"being written.{hint}"
        )
    return path


def load_checkpoint(path: str | Path, *, accelerator, model, optimizer, scheduler, method=None) -> dict:
    """Restore model, optimizer, scheduler, method state and this process's RNG; return trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    reading = path / STATE_FILE
    try:
        state = json.loads(reading.read_text())
        unwrapped = accelerator.unwrap_model(model)
        if (path / "adapter_model.safetensors").is_file():
            from peft import set_peft_model_state_dict

            reading = path / "adapter_model.safetensors"
            set_peft_model_state_dict(unwrapped, load_file(reading))
        else:
            weights = {}
            for reading in sorted(path.glob("model*.safetensors")):
                weights.update(load_file(reading))
            if not weights:
                raise FileNotFoundError("no model*.safetensors file")
            missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
            tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
            really_missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
            if really_missing or unexpected:
                raise ValueError(
                    f"weights do not match the model (missing {really_missing[:3]}, unexpected {unexpected[:3]})"
                )
        reading = path / "optimizer.pt"
        optimizer.load_state_dict(_load(reading, map_location="cpu"))
        reading = path / "scheduler.pt"
        scheduler.load_state_dict(_load(reading))
        load_method_state = getattr(method, "load_state_dict", None) if method is not None else None
        reading = path / "method_state.pt"
        if load_method_state is not None and reading.is_file():
            load_method_state(_load(reading))
        reading = path / f"rng_state_{accelerator.process_index}.pt"
        if reading.is_file():
            _set_rng_state(_load(reading))
        reading = path / f"rollout_cache_{accelerator.process_index}.pt"
        state["rollout_cache"] = _load(reading) if reading.is_file() else {}
    except Exception as exc:  # any unreadable piece means the checkpoint cannot be trusted
        m = _CHECKPOINT_RE.match(path.name)
        earlier = [p for p in list_checkpoints(path.parent) if m and int(p.name.split("-")[1]) < int(m.group(1))]
        hint = (
            f"resume from an earlier one ({earlier[-1]})"
            if earlier
            else "start again: --overwrite_output_dir true instead of --resume_from_checkpoint"
        )
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # garbage, or objects weights_only refused: never run them
            raise PosttrainError(
                f"cannot resume from {path}: {reading.name} is not a plain file of tensors and data (it is corrupt, "
                "or it holds Python objects that could run code when loaded), so it was not loaded. posttrain never "
                f"writes such files: if you did not make this checkpoint, do not trust it. Delete it and {hint}."
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PosttrainError(
            f"cannot resume from {path}: the checkpoint is corrupt or incomplete ({reading.name}: {reason}). "
            f"Delete it and {hint}."
        ) from exc
    return state
