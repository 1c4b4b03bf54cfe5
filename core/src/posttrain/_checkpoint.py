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
        service_state_<rank>.pt           # core services' state (samples generated ahead, asynchronous mode)
        trainer_state.json                # step, epoch, metric totals; written last

Under FSDP2 (parameters sharded across processes) the weights and optimizer state are written by every
process at once with ``torch.distributed.checkpoint`` instead of ``model.safetensors`` + ``optimizer.pt``::

    checkpoint-20/
        config.json, tokenizer files, scheduler.pt, rng_state_<rank>.pt, ..., trainer_state.json
        sharded/                          # .metadata + one __<rank>_0.distcp file per process

The sharded state is keyed by parameter name, so it loads on any number of processes (FSDP2, DDP or
one process): ``torch.distributed.checkpoint`` re-slices it for the new layout.

Under DeepSpeed (ZeRO-2, ZeRO-3) the engine writes its own checkpoint (``engine.save_checkpoint``: the module
state, and each process's partition of the fp32 weights and optimizer state) into ``deepspeed/`` of the same
temporary directory, so it is renamed into place with the rest::

    checkpoint-20/
        config.json, tokenizer files, scheduler.pt, rng_state_<rank>.pt, ..., trainer_state.json
        deepspeed/state/                  # mp_rank_00_model_states.pt + zero_pp_rank_<rank>_..._optim_states.pt

It resumes under DeepSpeed on the same number of processes (the partitions are per process). The final model at the
end of the run is always consolidated into one ``save_pretrained`` directory. ``output_dir`` must be on
a filesystem every node sees (as a two-node run needs anyway).

Every ``.pt`` file is loaded with ``torch.load(weights_only=True)``: only tensors, numbers, strings,
lists, tuples and dicts come back, so a planted pickle payload cannot run code on resume. States are
converted to those types when saved (the numpy RNG state's array becomes a tensor). The sharded
format's pickled parts follow the same rule: its ``.metadata`` is read by an unpickler that knows only
``torch.distributed.checkpoint``'s metadata classes and torch's dtypes/sizes, and its non-tensor entries
(learning rates, betas) by ``torch.load(weights_only=True)``. DeepSpeed loads its files with
``torch.load(weights_only=False)``, so before it does, each file is read once with ``weights_only=True``
(plus the few plain-data classes DeepSpeed writes, :func:`_deepspeed_safe_classes`): a file holding
anything else is refused before DeepSpeed unpickles it.
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
SHARDED_DIR = "sharded"
DEEPSPEED_DIR = "deepspeed"
_DEEPSPEED_TAG = "state"
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
    services: dict | None = None,
    save_total_limit: int | None = None,
    sharded: bool = False,
    deepspeed: bool = False,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process must call this (collective).

    ``sharded``: the model is FSDP2-sharded; weights and optimizer go to ``sharded/``. ``deepspeed``: the model
    is a DeepSpeed engine; its own checkpoint goes to ``deepspeed/`` (module docstring)."""
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
        if services and any(services.values()):
            torch.save(services, tmp / f"service_state_{accelerator.process_index}.pt")
        if sharded:
            _save_sharded(tmp / SHARDED_DIR, model, optimizer)  # every process writes its own shards
        if deepspeed:
            model.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, save_latest=False)
            accelerator.wait_for_everyone()
        if main:
            unwrapped = accelerator.unwrap_model(model)
            if sharded or deepspeed:
                unwrapped.config.save_pretrained(tmp)  # the weights are in sharded/ or deepspeed/
            else:
                unwrapped.save_pretrained(tmp, safe_serialization=True)
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            method_state = getattr(method, "state_dict", None) if method is not None else None
            if method_state is not None:
                torch.save(method_state(), tmp / "method_state.pt")
            # trainer_state.json last: its presence marks a complete checkpoint
            (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, **(state or {})}, indent=2))
            for file in [*tmp.iterdir(), *(tmp / DEEPSPEED_DIR).rglob("*")]:
                if file.is_file():  # sharded/: each process fsynced its own files
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


# -- sharded (FSDP2) weights and optimizer: torch.distributed.checkpoint, loaded as plain data only ---------------


def _save_sharded(directory: Path, model: Any, optimizer: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=dcp.FileSystemWriter(directory))
    except dcp.api.CheckpointException as exc:  # a BaseException: make it an error the callers report
        raise _first_failure(exc) from exc


def _load_sharded(directory: Path, model: Any, optimizer: Any) -> None:
    """Load into whatever layout this run has (FSDP2 on any number of processes, DDP, one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=_safe_reader(directory), planner=_safe_load_planner())
    except dcp.api.CheckpointException as exc:  # a BaseException: make it an error the callers report
        raise _first_failure(exc) from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _first_failure(exc: BaseException) -> Exception:
    """The first process's error inside a ``CheckpointException`` (which collects one per process)."""
    import pickle

    failures = getattr(exc, "failures", {}) or {}
    first = next(iter(failures.values()), None)
    text = str(first if first is not None else exc)
    if "refused to unpickle" in text:
        return pickle.UnpicklingError(text)
    if isinstance(first, OSError):
        return first
    return RuntimeError(text.strip().splitlines()[-1] if text.strip() else type(exc).__name__)


def _metadata_classes() -> dict[tuple[str, str], Any]:
    """The only classes a sharded checkpoint's ``.metadata`` may name (what ``dcp.save`` writes)."""
    import collections
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size}
    for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):  # the checkpoint's own path
        allowed[("pathlib", name)] = getattr(pathlib, name)
    for module in (metadata, filesystem):
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__:
                allowed[(module.__name__, name)] = value
    for dtype in {getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}:
        allowed[("torch", str(dtype).removeprefix("torch."))] = dtype
    for name in ("strided", "sparse_coo", "contiguous_format", "preserve_format", "channels_last"):
        allowed[("torch", name)] = getattr(torch, name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    return allowed


class _MetadataUnpickler:
    """``pickle.Unpickler`` that resolves only :func:`_metadata_classes`: a planted ``.metadata`` cannot run code."""

    def __init__(self, stream: Any) -> None:
        import pickle

        allowed = _metadata_classes()

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) in allowed:
                    return allowed[(module, name)]
                raise pickle.UnpicklingError(f"refused to unpickle {module}.{name} (not checkpoint metadata)")

        self._unpickler = Restricted(stream)

    def load(self) -> Any:
        return self._unpickler.load()


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_reader(directory: Path) -> Any:
    return _safe_reader_class()(directory)


def _safe_load_planner() -> Any:
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)  # learning rates, betas: plain data only
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


# -- DeepSpeed: the engine's own checkpoint, checked to be plain data before DeepSpeed unpickles it ---------------


def _deepspeed_safe_classes() -> list[Any]:
    """The classes DeepSpeed 0.19's ZeRO-2/3 optimizer files hold besides tensors, numbers, strings, lists and
    dicts: the stage (an int enum), the static loss scaler (a record of numbers) and each parameter's
    (start, numel) in the flat partition. Rebuilding them sets attributes; none runs code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def _check_deepspeed_files(directory: Path) -> None:
    """Read every DeepSpeed checkpoint file with ``weights_only=True`` (and :func:`_deepspeed_safe_classes`),
    so a file holding anything else raises ``UnpicklingError`` here, before DeepSpeed loads it unrestricted."""
    import pickle

    import torch

    files = sorted(f for f in directory.rglob("*.pt") if f.is_file())
    if not files:
        raise FileNotFoundError(f"no DeepSpeed state files in {directory}")
    with torch.serialization.safe_globals(_deepspeed_safe_classes()):
        for file in files:
            try:
                torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise pickle.UnpicklingError(f"{file.name}: refused to unpickle ({exc})") from None


def _load_deepspeed(directory: Path, engine: Any, processes: int) -> None:
    """Restore the engine's weights and optimizer partitions (the learning-rate schedule is posttrain's)."""
    tag = directory / _DEEPSPEED_TAG
    written_by = len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) or len(list(tag.glob("*optim_states.pt")))
    if written_by and written_by != processes:
        raise ValueError(
            f"written by {written_by} DeepSpeed processes, resumed on {processes}: a DeepSpeed checkpoint holds one "
            "optimizer partition per process, so resume on the same number of processes"
        )
    _check_deepspeed_files(directory)
    path, _ = engine.load_checkpoint(
        str(directory), tag=_DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")


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
        from posttrain._distributed import is_deepspeed

        under_deepspeed = is_deepspeed(accelerator)
        if under_deepspeed != (path / DEEPSPEED_DIR).is_dir():
            raise ValueError(
                "it was written under DeepSpeed, and this run is not: resume it with the same DeepSpeed config"
                if not under_deepspeed
                else "it was not written under DeepSpeed, and this run is: resume it with the launcher that wrote it"
            )
        if under_deepspeed:
            reading = path / DEEPSPEED_DIR
            _load_deepspeed(reading, model, accelerator.num_processes)
        elif (path / SHARDED_DIR).is_dir():
            reading = path / SHARDED_DIR
            _load_sharded(reading, model, optimizer)
        elif (path / "adapter_model.safetensors").is_file():
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
        if not (path / SHARDED_DIR).is_dir() and not under_deepspeed:
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
        reading = path / f"service_state_{accelerator.process_index}.pt"
        state["services"] = _load(reading) if reading.is_file() else {}
    except Exception as exc:  # any unreadable piece means the checkpoint cannot be trusted
        m = _CHECKPOINT_RE.match(path.name)
        earlier = [p for p in list_checkpoints(path.parent) if m and int(p.name.split("-")[1]) < int(m.group(1))]
        hint = (
            f"resume from an earlier one ({earlier[-1]})"
            if earlier
            else "start again: --overwrite_output_dir true instead of --resume_from_checkpoint"
        )
        import pickle

        if isinstance(exc, pickle.UnpicklingError) or "refused to unpickle" in str(
            exc
        ):  # garbage, or objects weights_only refused: never run them
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
