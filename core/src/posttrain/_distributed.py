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
    timeout = timedelta(seconds=config.ddp_timeout)
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        plugin = _deepspeed_plugin(config, mixed_precision)  # checked before any process group starts
        if cpu:
            _prepare_deepspeed_on_cpu()
            # accelerate takes its DeepSpeed path only with cpu=False; gloo is what DeepSpeed's CPU accelerator
            # uses without oneCCL, named here because accelerate would otherwise find no backend at all
            kwargs = InitProcessGroupKwargs(backend="gloo", timeout=timeout)
        else:
            kwargs = InitProcessGroupKwargs(timeout=timeout)
        accelerator = Accelerator(
            mixed_precision=mixed_precision, cpu=False, deepspeed_plugin=plugin, kwargs_handlers=[kwargs]
        )
        _fill_deepspeed_config(accelerator, config)
        return accelerator
    kwargs = InitProcessGroupKwargs(timeout=timeout)
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


# -- DeepSpeed ZeRO-2 / ZeRO-3 -------------------------------------------------------------------------------------
#
# The loop's normalisation (training-loop.md) needs the step's item count N, known only after every micro-batch's
# forward. Under DeepSpeed the engine reduces (averages) the gradients over the processes and keeps them in its own
# partitioned buffers, so the loop cannot scale them after backward as it does otherwise. It uses the ZeRO
# optimizers' external loss scale instead: each micro-batch's summed loss goes through ``engine.backward`` with the
# scale 1 (so the buffers hold sum / world), and before ``engine.step`` the scale is set to N / world, which the
# optimizer divides out of the gradients (and out of the norm it clips with and reports) before the update:
# exactly d(sum of all losses / N), the same gradient as one process, clipped by DeepSpeed at max_grad_norm.


def _deepspeed_plugin(config: Any, mixed_precision: str) -> Any:
    """accelerate's DeepSpeed plugin for the launcher's environment (inline ``deepspeed_config`` or
    ``deepspeed_config_file``), built as ``Accelerator()`` would build it, after refusing what the loop cannot
    run exactly under DeepSpeed, with the reason."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the accelerate config selects DeepSpeed, which is not installed here: pip install deepspeed "
            "(posttrain is tested with 0.19), or use --accelerate_config fsdp2."
        ) from None
    if mixed_precision == "fp16":
        raise ConfigError(
            "fp16 under DeepSpeed is not supported: DeepSpeed's fp16 mode scales the loss dynamically through the "
            "same loss scale posttrain uses to normalise each step exactly (docs/distributed.md). Use --bf16 true, "
            "or FSDP2 (--accelerate_config fsdp2) for fp16."
        )
    if getattr(config, "use_peft", False):
        raise ConfigError(
            "LoRA (use_peft: true) under DeepSpeed is not supported yet; use --accelerate_config fsdp2, which "
            "shards the frozen base and the adapters together (docs/distributed.md)."
        )
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(
            f"the DeepSpeed config sets zero_optimization.stage {stage}; posttrain supports ZeRO stages 2 and 3 "
            "(--accelerate_config deepspeed-zero2 or deepspeed-zero3). Use DDP (--accelerate_config ddp) for an "
            "unsharded run."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none")).lower()
        if device != "none":
            raise ConfigError(
                f"the DeepSpeed config sets zero_optimization.{key}.device {device}; offloading under DeepSpeed is "
                "not supported yet (DeepSpeed replaces the optimizer with its own CPU Adam, compiled at start-up). "
                "Use FSDP2 with fsdp_offload_params: true (docs/distributed.md)."
            )
    if plugin.zero3_init_flag:
        raise ConfigError(
            "the accelerate config sets zero3_init_flag: true (accelerate's default for a ZeRO-3 "
            "deepspeed_config_file); posttrain loads the model whole on every process and lets ZeRO-3 partition it "
            "when it is prepared: set zero3_init_flag: false in the accelerate config."
        )
    for key, what in (("optimizer", "optim, learning_rate, weight_decay"), ("scheduler", "lr_scheduler_type")):
        if key in ds:
            raise ConfigError(
                f"the DeepSpeed config has a {key!r} section; posttrain builds the {key} from its own config "
                f"({what}): remove the section."
            )
    for dtype in ("fp16", "bf16"):
        enabled = str(ds.get(dtype, {}).get("enabled", "auto")).lower()
        if enabled != "auto" and (enabled == "true") != (mixed_precision == dtype):
            raise ConfigError(
                f"the DeepSpeed config sets {dtype}.enabled: {enabled}, but this run's config says "
                f"{dtype} {str(mixed_precision == dtype).lower()}; posttrain's config decides (--bf16 true): set "
                f"{dtype}.enabled to 'auto' or remove it."
            )
    explicit = _explicit_deepspeed_values(ds)
    gas = config.gradient_accumulation_steps
    own = {
        "train_micro_batch_size_per_gpu": (config.per_device_train_batch_size, "per_device_train_batch_size"),
        "gradient_accumulation_steps": (gas, "gradient_accumulation_steps"),
        "gradient_clipping": (float(max(config.max_grad_norm, 0.0)), "max_grad_norm"),
    }
    for key, (value, field) in own.items():
        given = explicit.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}: {given}, but posttrain's config decides it ({field} = {value}): "
                f"set {key} to 'auto' or remove it."
            )
        ds[key] = value
    return plugin


def _explicit_deepspeed_values(ds: dict) -> dict:
    """The values the user wrote: the ``deepspeed_config_file`` as written (accelerate fills in a missing
    gradient_accumulation_steps with 1), or the inline config, where accelerate writes 'auto' for what is unset."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return ds


def _prepare_deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU accelerator, without the shared-memory all-reduce it would otherwise compile (a C++ build
    at every start-up on a new machine) for its inference kernels; training's collectives go through gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _fill_deepspeed_config(accelerator: Any, config: Any) -> None:
    """What the engine needs once the number of processes is known; the models load whole (below)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    gas = config.gradient_accumulation_steps
    ds["train_batch_size"] = config.per_device_train_batch_size * gas * accelerator.num_processes
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # consolidated final model
    accelerator.gradient_accumulation_steps = gas  # what accelerate compares the DeepSpeed config with
    # accelerate registers the DeepSpeed config with transformers whatever zero3_init_flag says, and
    # from_pretrained then builds ZeRO-3 models already partitioned (deepspeed.zero.Init); without the flag
    # every model (policy, reference, teacher) loads whole, as in any other run, and is partitioned when prepared
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def is_deepspeed(accelerator: Any) -> bool:
    """True when the run is under a DeepSpeed engine (ZeRO-2 or ZeRO-3)."""
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage under DeepSpeed, 0 otherwise; stage 3 partitions the parameters themselves."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def deepspeed_backward(engine: Any, loss: Any, last: bool) -> None:
    """One micro-batch's backward under DeepSpeed: the summed loss as is (no 1/gradient_accumulation_steps);
    ``last`` marks the accumulation boundary, where ZeRO finishes reducing the step's gradients."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)  # the loss scale is 1 here (set back after every step)


def deepspeed_step(engine: Any, world: int, total_n: float) -> float:
    """Normalise by ``total_n`` items over ``world`` processes (the module comment above), clip, step; return
    the gradient norm (after normalisation, before clipping) that DeepSpeed computed."""
    engine.optimizer.override_loss_scale(total_n / world)
    engine.step()
    engine.optimizer.override_loss_scale(1.0)
    norm = engine.get_global_grad_norm()  # None where the config sets zero_optimization.compute_grad_norm: false
    return float("nan") if norm is None else float(norm)


def _deepspeed_frozen(model: Any, accelerator: Any) -> Any:
    """A frozen model under ZeRO-3: a DeepSpeed inference engine partitioned like the policy (1/world of its
    parameters per process; each forward gathers a layer at a time, a collective)."""
    import copy

    import deepspeed

    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 1024
    zero = ds["zero_optimization"]
    for key, value in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == "auto":  # accelerate fills these for the policy when it prepares it
            zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def is_zero3_module(model: Any) -> bool:
    """True for a module whose parameters ZeRO-3 partitions (its forward gathers them, a collective)."""
    first = next(iter(model.parameters()), None)
    return first is not None and hasattr(first, "ds_id")


def is_sharded(accelerator: Any) -> bool:
    """True when parameters are sharded across processes with FSDP2 (checkpoints in ``sharded/``)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def full_state_dict(accelerator: Any, model: Any) -> dict | None:
    """The whole model's state dict on the main process (None elsewhere); a collective under FSDP2 and
    ZeRO-3 (which gathers the partitions: ``stage3_gather_16bit_weights_on_model_save``)."""
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def shard_frozen(model: Any, accelerator: Any) -> Any:
    """Shard a frozen model (a reference or teacher) like the policy: one ``fully_shard`` per decoder layer
    and one for the root, so it costs 1/world of its memory per process. Its forward is then a collective,
    which every process calls the same number of times (each has the same number of rows per step).
    Under DeepSpeed ZeRO-3 it becomes an inference engine partitioned the same way."""
    if is_deepspeed(accelerator):
        return _deepspeed_frozen(model, accelerator)
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
