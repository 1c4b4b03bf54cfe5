"""Several processes: the Accelerator the loop runs on, sharded engines, and failures that name a rank.

The loop never builds a scheduler or an engine of its own: ``accelerate launch --config_file X`` (or
``torchrun``) starts the processes and sets the environment, and :func:`make_accelerator` turns that
environment into an ``Accelerator`` exactly as accelerate documents, with two additions:

* the process-group timeout is ``config.ddp_timeout`` seconds, so a rank that hangs makes the others
  fail after that long instead of waiting forever;
* accelerate 1.15 switches its FSDP path on only for accelerator devices. FSDP2 (``fully_shard``) runs on
  CPU with gloo in torch 2.13, so a CPU run launched with an FSDP2 config gets accelerate's FSDP2 path too:
  the multi-process CPU tests then exercise the same wrapping, state-dict and checkpoint code a GPU run uses.

What each process is doing is written to the launcher's key-value store (:func:`doing`); when a
collective call fails (a peer died, or hung past the timeout) :func:`explain` turns the error into a
:class:`RankFailure` that says which process stopped answering and what it was last doing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from posttrain._errors import ConfigError, PosttrainError

_PHASE_KEY = "posttrain/doing/{rank}"


class RankFailure(PosttrainError):
    """A collective call failed: another process died or hung past ``ddp_timeout``; says which and where."""


def make_accelerator(config: Any, mixed_precision: str, cpu: bool) -> Any:
    """The Accelerator for this run, from the launcher's environment (see the module docstring)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "the accelerate config selects DeepSpeed, which the posttrain loop does not support yet: DeepSpeed's "
            "engine steps the optimizer inside backward() and keeps ZeRO gradients in its own buffers, while the "
            "loop scales the summed gradients by processes / items once per step, after every micro-batch's "
            "backward (the exact normalisation of training-loop.md). Use FSDP2 instead, which shards the same "
            "things: --accelerate_config fsdp2 (like ZeRO-3; fsdp_reshard_after_forward: false is like ZeRO-2, "
            "fsdp_offload_params: true like ZeRO-Offload). See docs/distributed.md."
        )
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher_precision not in ("no", mixed_precision):
        raise ConfigError(
            f"the accelerate config sets mixed_precision: {launcher_precision}, but this run's config says "
            f"{'bf16 and fp16 false' if mixed_precision == 'no' else mixed_precision}; posttrain's config decides "
            f"(--bf16 true / --fp16 true): set mixed_precision: 'no' in the accelerate config, or set the same "
            "precision in both."
        )
    fsdp_on_cpu = cpu and _env_true("ACCELERATE_USE_FSDP")
    if fsdp_on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "the accelerate config selects FSDP version 1 on CPU; posttrain supports FSDP2 "
            "(fsdp_version: 2 in the config file), which runs on CPU with gloo."
        )
    kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[kwargs])
    if fsdp_on_cpu and accelerator.num_processes > 1:
        _enable_fsdp2_on_cpu(accelerator)
    return accelerator


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _enable_fsdp2_on_cpu(accelerator: Any) -> None:
    """Give a multi-process CPU accelerator the FSDP2 plugin the environment describes.

    accelerate keeps the distributed type in two shared states (``PartialState`` and ``AcceleratorState``);
    both must say FSDP, or the next ``AcceleratorState()`` copies MULTI_CPU back.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the environment, as accelerate does on GPUs
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_sharded(accelerator: Any) -> bool:
    """True when parameters are sharded across processes (FSDP2), so every save is a collective."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def full_state_dict(accelerator: Any, model: Any) -> dict | None:
    """The whole model's state dict on the main process (None elsewhere); a collective under FSDP2."""
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def shard_frozen(model: Any, accelerator: Any) -> Any:
    """Shard a frozen model (a reference or teacher) like the policy: one ``fully_shard`` per decoder layer
    and one for the root, so it costs 1/world of its memory per process. Its forward is then a collective,
    which every process calls the same number of times (each has the same number of rows per step)."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or [])
    mesh = _mesh(accelerator)
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def loading_whole():
    """Load a model whole on every process even under ``cpu_ram_efficient_loading``, where transformers
    loads only on local rank 0 and leaves meta tensors elsewhere (accelerate's prepare() fills those in for
    the policy, but nothing does for a frozen model that :func:`shard_frozen` shards itself)."""
    saved = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def _mesh(accelerator: Any) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))


def is_fsdp_module(model: Any) -> bool:
    """True for a module wrapped by FSDP2's ``fully_shard`` (its forward all-gathers parameters)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


# -- what each process is doing, and failures that say so -------------------------------------------------------


def _store() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):  # pragma: no cover - a process group without a store
        return None


_last: dict = {}  # this process's last record, for failed()


def doing(what: str, step: int) -> None:
    """Record what this process is doing (one small write to the launcher's store); a no-op in one process."""
    _record({"what": what, "step": step, "t": time.time()})


def _record(record: dict) -> None:
    store = _store()
    if store is None:
        return
    import torch.distributed as dist

    _last.clear()
    _last.update(record)
    with contextlib.suppress(Exception):  # the record is advice: never let it fail a run
        store.set(_PHASE_KEY.format(rank=dist.get_rank()), json.dumps(record))


def failed(exc: BaseException) -> None:
    """This process stops on an error of its own (not a failed collective): record the error with what the
    process was doing, so the processes left waiting name it in their :class:`RankFailure`, and add a note
    naming this process to the exception (its traceback then says which process and where, among N logs)."""
    store = _store()
    if store is None or not _last:
        return
    import torch.distributed as dist

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = type(exc).__name__ + (f": {text}" if text else "")
    _record({**_last, "error": error, "t": time.time()})
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(
            f"(process {dist.get_rank()} of {dist.get_world_size()} raised this while {_last['what']} at step "
            f"{_last['step']})"
        )


def _board() -> dict[int, dict]:
    """Every process's last record, read without blocking on a process that never wrote one."""
    store = _store()
    if store is None:
        return {}
    import torch.distributed as dist

    found = {}
    for rank in range(dist.get_world_size()):
        key = _PHASE_KEY.format(rank=rank)
        with contextlib.suppress(Exception):
            if store.check([key]):
                found[rank] = json.loads(store.get(key))
    return found


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (gloo/NCCL), as opposed to an error in this process's own work."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()  # the backends' own wording, not any error that mentions a timeout
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "nccl", "connection closed by peer", "timed out waiting", "watchdog")
    )


#: the backends' wording when a peer's connection ended (it exited or was killed), not a timeout
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused")


def explain(exc: BaseException, timeout_s: float) -> RankFailure:
    """Turn a failed collective into a message naming the process that stopped and what it was doing: one
    that raised (its error, recorded by :func:`failed`), one whose connection closed (it died without an error
    of its own: killed, out of memory, a crash in native code) or one that stopped answering (hung)."""
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    board = _board()
    now = time.time()
    mine = board.get(me, {})
    lines = [
        f"process {me} of {world} failed in a collective call while {mine.get('what', 'running')} at step "
        f"{mine.get('step', '?')}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    ]
    behind, raised = [], []
    for rank in range(world):
        record = board.get(rank)
        if record is None:
            lines.append(f"  process {rank}: never reported (it died or hung during start-up)")
            behind.append(rank)
            continue
        error = f", raised {record['error']}" if record.get("error") else ""
        lines.append(
            f"  process {rank}: {record['what']} at step {record['step']}{error} ({now - record['t']:.0f} s ago)"
        )
        if rank != me and record.get("error"):
            raised.append(rank)
        elif rank != me and (record["step"], record["what"]) != (mine.get("step"), mine.get("what")):
            behind.append(rank)
    gone = any(marker in str(exc).lower() for marker in _PEER_GONE)
    if raised:
        ranks = ", ".join(map(str, raised))
        lines.append(f"Process {ranks} stopped on an error of its own (above); its traceback is in its log.")
    elif gone:
        suspects = f"Process {', '.join(map(str, behind))}" if behind else "Another process"
        lines.append(
            f"{suspects} died: its connection closed without an error of its own, so something outside Python "
            "ended it (out of memory, a signal, a crash in native code); its log and the launcher's summary say "
            "more."
        )
    else:
        suspects = f"Process {', '.join(map(str, behind))}" if behind else "Another process"
        lines.append(
            f"{suspects} stopped answering (it hung, or took longer than ddp_timeout={timeout_s:g} s); its own "
            "log above says why. If a step is legitimately slow (long generations, a slow disk), raise "
            "--ddp_timeout."
        )
    lines[-1] += " Resume from the newest checkpoint with --resume_from_checkpoint latest."
    return RankFailure("\n".join(lines))
