"""The one training loop every method uses. Read it top to bottom.

    train():
        run = _set_up(...)        # accelerator, seed, model + tokenizer, method.setup, data, optimizer, resume
        while run.step < run.total_steps and no stop was requested:
            _optimizer_step(run)  # gradient_accumulation_steps micro-batches: [rollout] -> loss -> backward,
                                  # then scale by world_size / (total n_items), clip, step, schedule
            _log_evaluate_save(run)
        _finish(run)              # final evaluation, save_pretrained(output_dir)

Why the gradient is scaled after backward: a method returns a *sum* and a count (the contract in
``posttrain.Method``). DDP averages gradients over processes, so the summed gradient is
``world_size * mean``; multiplying by ``world_size / N`` gives exactly d(sum of all losses / N).
The count is known only after the forward passes (online methods generate first), and gradients are
linear, so scaling them once per step is exact and costs one fused multiply.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain import _checkpoint as ckpt
from posttrain import _distributed as dist
from posttrain import _preflight, _reader, _resume, _run_guard, vision
from posttrain import _tracking as tracking
from posttrain._errors import ConfigError, DataError, PluginError, PosttrainError
from posttrain._method import TrainContext, TrainOutcome, UpcomingBatch, method_problems, optional_member

__all__ = ["NonFiniteLossError", "TrainResult", "evaluate", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: steps done, where the run is, every logged row, how it ended.

    .. versionadded:: 0.1
    """

    global_step: int
    output_dir: Path
    log_history: list[dict] = field(default_factory=list)
    interrupted: bool = False
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run

    @property
    def final_loss(self) -> float | None:
        losses = [row["loss"] for row in self.log_history if "loss" in row]
        return losses[-1] if losses else None


class NonFiniteLossError(PosttrainError):
    """The loss became NaN or infinite; the message names the step and the rows of its batch.

    .. versionadded:: 0.1
    """


@dataclass
class _Run:
    """The state of one training run, shared by the named steps below."""

    method: Any
    config: Any
    ctx: TrainContext
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    train_rows: Any
    eval_rows: Any
    output_dir: Path
    total_steps: int
    rows_per_micro: int  # dataset rows in one micro-batch (fewer than items for online methods)
    reuse: int  # optimizer steps per rolled-out batch (batch_reuse)
    callbacks: tracking.Callbacks
    window: tracking.LogWindow
    bar: tracking.ProgressBar
    result: TrainResult
    step: int = 0
    epoch: int = 0
    stop_requested: str | None = None  # name of the signal that asked to stop
    rollout_cache: dict[int, dict] = field(default_factory=dict)  # micro-step -> rolled-out batch (reuse > 1)
    lock: Any = None  # the output_dir lock (main process)
    resume_path: Path | None = None
    lengths: tuple[int, ...] | None = None  # each train row's token count, with group_by_length


def train(
    method: Any,
    config: Any,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    callbacks: list[Any] | None = None,
    rewards: dict | None = None,
    accelerator: Any = None,
    provenance: dict | None = None,
) -> TrainResult:
    """Train ``model`` with ``method`` as ``config`` says. Models/datasets not passed are loaded from the config.

    ``callbacks=None`` adds the callbacks installed plugins register for this config (as ``posttrain train``
    does); a list replaces them.

    Emits the method's ``ExperimentalWarning`` and writes ``provenance.json`` exactly as ``posttrain train``
    does. Raises :class:`PosttrainError` subclasses for user errors (bad config, data, paths).

    .. versionadded:: 0.1
    """
    run = _set_up(method, config, model, tokenizer, train_dataset, eval_dataset, callbacks, rewards, accelerator)
    outcome = "failed"
    error: BaseException | None = None
    try:
        _write_run_files(run, provenance)
        run.callbacks.emit("on_train_begin", run.ctx)
        with _stop_on_signals(run):
            _notify_services(run)  # the policy is ready for the first step (a generation worker starts here)
            while run.step < run.total_steps and run.stop_requested is None:
                _optimizer_step(run)
                _log_evaluate_save(run)
        if run.stop_requested is not None and run.step < run.total_steps:
            _save_on_interrupt(run)
            outcome = "interrupted"
        else:
            _finish(run)
            outcome = "finished"
    except BaseException as exc:
        error = exc
        if run.accelerator.num_processes > 1 and dist.is_collective_failure(exc):
            error = dist.explain(exc, run.config.ddp_timeout)  # which process stopped, and what it was doing
            raise error from exc
        if run.accelerator.num_processes > 1 and not isinstance(exc, KeyboardInterrupt):
            dist.failed(exc)  # the processes left waiting for this one name it and its error
        if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: stopped at once, without saving
            run.accelerator.print(f"stopped at step {run.step} without saving. {_run_guard.advice(run.output_dir)}")
        raise
    finally:
        run.bar.close()
        _close_services(run)
        try:
            run.callbacks.emit("on_train_end", run.ctx, TrainOutcome(outcome, run.step, run.output_dir, error))
        finally:
            if run.lock is not None:
                run.lock.release()
    return run.result


# -- set up --------------------------------------------------------------------------------------------


def _set_up(method, config, model, tokenizer, train_dataset, eval_dataset, callbacks, rewards, accelerator) -> _Run:
    """Everything before the first step, in the order a reader expects; fails before any model loads
    when the method, the config or the output directory is unusable."""
    from posttrain import models
    from posttrain.config import config_problems

    _quiet_library_progress()
    problems = method_problems(method)
    if problems:
        raise PluginError(
            f"method {getattr(method, 'name', method)!r} breaks the plugin contract: " + "; ".join(problems)
        )
    problems = config_problems(config)  # the CLI checked already; a config built in Python is checked here
    if problems:
        raise ConfigError(problems)
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    # without an accelerator, cpu=True is what makes accelerate run multi-process CPU (gloo) under torchrun
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    cpu = config.use_cpu or not has_accelerator
    device = accelerator.device.type if accelerator is not None else ("cpu" if cpu else "cuda")
    _preflight.check(config, device)  # before Accelerator(), which fails on some of these with a traceback
    accelerator = accelerator or dist.make_accelerator(config, mixed, cpu)
    models.fit_max_length(config)  # before the saved config is compared on resume
    resume_path, lock = _run_guard.claim(config, getattr(method, "name", None), accelerator.is_main_process)
    try:
        run = _load_everything(
            method, config, model, tokenizer, train_dataset, eval_dataset, callbacks, rewards, accelerator, resume_path
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _load_everything(
    method, config, model, tokenizer, train_dataset, eval_dataset, callbacks, rewards, accelerator, resume_path
) -> _Run:
    from accelerate.utils import set_seed

    from posttrain import models

    output_dir = Path(config.output_dir)
    set_seed(config.seed)
    tokenizer, processor = _tokenizer_and_processor(config, tokenizer)
    if model is None:
        load = optional_member(method, "load_model")
        # FSDP2's cpu_ram_efficient_loading leaves meta tensors on all but local rank 0 until prepare(); a method
        # that scores the data with the policy before that (precompute_ref_log_probs) needs it whole everywhere
        whole = dist.loading_whole() if getattr(config, "precompute_ref_log_probs", False) else contextlib.nullcontext()
        with whole:
            model = load(config) if load else models.load_causal_lm(config.model, config)
    vision.freeze_parts(model, config.freeze)
    models.check_max_length(model, config, config.model or None)
    model = models.apply_peft(model, config)
    if config.torch_compile:
        model.compile()
    ctx = TrainContext(
        config=config,
        tokenizer=tokenizer,
        accelerator=accelerator,
        model=model,
        model_path=config.model or None,
        rewards=rewards or {},
        processor=processor,
    )
    if not any(p.is_meta for p in model.parameters()):  # FSDP2 with cpu_ram_efficient_loading: prepare() fills it
        model.to(accelerator.device)
    dist.doing("setting up the method", 0)
    setup = optional_member(method, "setup")
    if setup:
        setup(ctx)
    train_rows = _prepared(method, ctx, train_dataset if train_dataset is not None else config.dataset, "train")
    eval_source = eval_dataset if eval_dataset is not None else config.eval_dataset
    eval_rows = _prepared(method, ctx, eval_source, "eval") if eval_source is not None else None
    reuse_of = optional_member(method, "batch_reuse")
    reuse = int(reuse_of(config)) if reuse_of else 1
    rows_per_micro = _rows_per_batch(method, config, config.per_device_train_batch_size)
    total_steps = _total_steps(config, len(train_rows), rows_per_micro, accelerator.num_processes, reuse)
    if resume_path is not None:
        _resume.check_total_steps(total_steps, resume_path)
    optimizer = _optimizer(model, config)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    scheduler = _scheduler(optimizer, config.lr_scheduler_type, warmup, total_steps)
    dist.doing("wrapping the model (accelerator.prepare)", 0)
    model, optimizer = accelerator.prepare(model, optimizer)
    main = accelerator.is_main_process
    run = _Run(
        method=method,
        config=config,
        ctx=ctx,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        train_rows=train_rows,
        eval_rows=eval_rows,
        output_dir=output_dir,
        total_steps=total_steps,
        rows_per_micro=rows_per_micro,
        reuse=reuse,
        callbacks=tracking.Callbacks(_plugin_callbacks(config) if callbacks is None else callbacks, main),
        window=tracking.LogWindow(accelerator),
        bar=tracking.ProgressBar(total_steps, 0, getattr(method, "name", "train"), enabled=False),
        result=TrainResult(global_step=0, output_dir=output_dir),
    )
    if resume_path is not None:
        dist.doing(f"loading {resume_path.name}", 0)
        state = ckpt.load_checkpoint(
            resume_path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, method=method
        )
        _resume.apply_hyperparameters(optimizer, scheduler, config)  # the config's values, never half-applied
        run.step, run.epoch = state["global_step"], state.get("epoch", 0)
        run.window.totals.update(state.get("metric_totals", {}))
        run.rollout_cache = state.get("rollout_cache", {})
        for name, service in run.ctx.services.items():
            service.load_state_dict(state.get("services", {}).get(name, {}))
    if config.group_by_length:
        run.lengths = _row_lengths(method, train_rows)
    run.ctx.step = run.result.global_step = run.step
    run.ctx._upcoming = lambda horizon: _upcoming_batches(run, horizon)
    if main:
        run.callbacks.prepend(tracking.build_loggers(config, output_dir, run.step if resume_path else None))
    run.bar = tracking.ProgressBar(
        total_steps, run.step, getattr(method, "name", "train"), enabled=main and not config.disable_progress_bar
    )
    run.resume_path = resume_path
    return run


def _lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier at ``step``: transformers' schedule formulas (``get_scheduler``), written out."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant_with_warmup":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # cosine, half a cycle


def _scheduler(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    """The ``lr_scheduler_type`` schedule as a ``LambdaLR``, the same numbers and checkpoint state as transformers'
    ``get_scheduler``; importing that (``transformers.optimization``) imports the Trainer's utilities and PEFT,
    ~0.4 s of CPU before the first step that a run without LoRA never uses."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_lr_factor, kind=kind, warmup=warmup, total=total)
    )


def _plugin_callbacks(config: Any) -> list[Any]:
    """Callbacks that ``posttrain.plugins`` modules add for this config (trackers for ``report_to``): the Python
    API gets the same ones as ``posttrain train`` when it passes no ``callbacks`` of its own."""
    from posttrain import _registry

    return _registry.callbacks_for(config)


def _tokenizer_and_processor(config: Any, given: Any) -> tuple[Any, Any]:
    """(tokenizer, processor or None): a processor given as ``tokenizer`` (TRL's ``processing_class``) or loaded
    for a vision-language model brings its tokenizer; a text model gets its tokenizer alone."""
    from posttrain import models

    if given is not None:
        inner = getattr(given, "tokenizer", None)
        return (inner, given) if inner is not None and hasattr(given, "image_processor") else (given, None)
    if vision.is_vision_language_model(config.model, config.trust_remote_code):
        processor = models.load_processor(config.model, config.trust_remote_code)
        return processor.tokenizer, processor
    return models.load_tokenizer(config.model, config.trust_remote_code), None


def _quiet_library_progress() -> None:
    """Our bar is the one progress display: silence transformers' and datasets' own bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _prepared(method: Any, ctx: TrainContext, source: Any, split: str) -> Any:
    """Load, check and ``prepare`` one dataset, or read the rows from the prepared-data cache
    (:mod:`posttrain._prepare_cache`); then the method's ``precompute``, never cached. Row errors name the file and
    a runnable check-data command."""
    from posttrain import _prepare_cache as cache

    path = str(source) if isinstance(source, (str, Path)) else None
    split_name = ctx.config.dataset_split if split == "train" else "train"
    entry, source, _why_not = cache.entry_for(method, ctx, source, split_name)
    main = ctx.accelerator is None or ctx.accelerator.is_main_process
    found = cache.load(entry, main) if entry is not None else None
    if found is not None:
        rows, recorded = found
        _say(ctx, f"prepared data ({split}): cache hit ({entry.short}), {len(rows)} rows")
        cache.replay_recorded(recorded)
    else:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every warning is recorded for the entry, and shown below
                dataset = _reader.load_checked(method, source, split_name)  # the reader `check-data` uses too
                if entry is not None and vision.has_images(dataset):
                    entry = None  # image files are not in the key
                if entry is not None:
                    _say(ctx, f"prepared data ({split}): cache miss ({entry.short}), preparing {len(dataset)} rows")
                rows = _prepare_rows(method, ctx, dataset, path, split)
        finally:
            cache.replay(caught)  # as if nothing had caught them (once per text and place)
        if entry is not None:
            cache.store(entry, rows, cache.recorded_warnings(caught), main)
    precompute = optional_member(method, "precompute")
    if precompute:
        precompute(rows, ctx)  # per-run values computed by a model (reference log-probs): after the cache
    return rows


def _prepare_rows(method: Any, ctx: TrainContext, dataset: Any, path: str | None, split: str) -> Any:
    if vision.has_images(dataset):
        _check_image_support(method, ctx, path or f"the {split} dataset")
    try:
        rows = method.prepare(dataset, ctx)
    except DataError as exc:
        if path:
            raise exc.for_source(path, getattr(method, "name", None)) from exc.__cause__
        raise
    if len(rows) == 0:
        raise PosttrainError(
            f"the {split} dataset{f' {path!r}' if path else ''} has no usable rows after preparation (all "
            "filtered out; the warnings above say why, e.g. prompts longer than max_length)."
        )
    return rows


def _say(ctx: TrainContext, text: str) -> None:
    """One line on the main process."""
    if ctx.accelerator is not None:
        ctx.accelerator.print(text)
    else:
        print(text)


def _check_image_support(method: Any, ctx: TrainContext, source: str) -> None:
    """Rows with images need a vision-language model (a method without ``supports_images`` was refused with the
    row checks, in :func:`posttrain._reader.problems_and_warnings`)."""
    if ctx.processor is None:
        raise DataError(
            f"{source} has rows with images, but the model{f' at {ctx.model_path!r}' if ctx.model_path else ''} is "
            "not a vision-language model (its config has no vision_config, or no processor was given), so it cannot "
            "see them. Train a "
            "vision-language model (e.g. a LLaVA, Idefics3 or Qwen2-VL checkpoint), or drop the images/image column."
        )


def _rows_per_batch(method: Any, config: Any, batch_size: int) -> int:
    rows_of = optional_member(method, "rows_per_batch")
    rows = int(rows_of(config, batch_size)) if rows_of else batch_size
    if rows < 1:
        raise PluginError(
            f"method {method.name!r}: rows_per_batch(config, {batch_size}) returned {rows}; it must be >= 1"
        )
    return rows


def _total_steps(config: Any, n_rows: int, rows_per_micro: int, world: int, reuse: int) -> int:
    per_step = rows_per_micro * world * config.gradient_accumulation_steps
    steps_per_epoch = n_rows // per_step
    if steps_per_epoch == 0:
        raise PosttrainError(
            f"the dataset has {n_rows} rows but one optimizer step needs {per_step} (rows per micro-batch "
            f"{rows_per_micro} x processes {world} x gradient_accumulation_steps "
            f"{config.gradient_accumulation_steps}); lower them or add data."
        )
    if config.max_steps > 0:
        return config.max_steps
    return math.ceil(config.num_train_epochs * steps_per_epoch * reuse)


def _optimizer(model: torch.nn.Module, config: Any) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    try:  # one fused kernel (transformers' default, adamw_torch_fused); on CPU torch's default is a per-tensor loop
        return torch.optim.AdamW(groups, **kwargs, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def _write_run_files(run: _Run, provenance: dict | None) -> None:
    """The resolved config and the provenance (plugins used, versions, status) beside the model."""
    if not run.accelerator.is_main_process:
        return
    import json

    from posttrain import _environment
    from posttrain.config import save_config

    with _run_guard.writing("the run's files", run.output_dir):
        _run_guard.open_directory(run.output_dir, run.config.overwrite_output_dir and run.resume_path is None)
        save_config(run.config, run.output_dir / "posttrain_config.yaml", getattr(run.method, "name", None))
        if provenance is None:
            provenance = _environment.provenance_for(run.method, list(run.ctx.rewards), run.config)
        (run.output_dir / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))


# -- one optimizer step ------------------------------------------------------------------------------------


def _step_rows(
    step: int,
    n_rows: int,
    batch_size: int,
    accumulation: int,
    world: int,
    rank: int,
    seed: int,
    lengths: tuple[int, ...] | None = None,
):
    """Row indices of each micro-batch of data step ``step`` on process ``rank``, and the epoch.

    The order is a pure function of (seed, epoch, lengths), so resuming at any step replays the same data,
    and P processes with batch B see exactly the rows one process with batch P*B sees. With ``lengths``
    (``group_by_length``) the epoch's rows are grouped by length first (:func:`_grouped_by_length`).
    """
    global_micro = batch_size * world
    per_epoch = n_rows // (global_micro * accumulation)
    epoch, within = divmod(step, per_epoch)
    if lengths is None:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = _grouped_by_length(seed + epoch, lengths, global_micro, accumulation, per_epoch)
    start = within * accumulation * global_micro
    return [
        order[start + k * global_micro + rank * batch_size : start + k * global_micro + (rank + 1) * batch_size]
        for k in range(accumulation)
    ], epoch


#: A mega-batch holds at most this many optimizer steps' rows (transformers' ``mega_batch_mult`` cap)
_MEGA_BATCH_STEPS = 50


@functools.lru_cache(maxsize=2)  # the current epoch (and the one a look-ahead reaches): one sort per epoch
def _grouped_by_length(seed: int, lengths: tuple[int, ...], micro: int, accumulation: int, steps: int) -> list[int]:
    """One epoch's row order with rows of similar length in the same micro-batch (``group_by_length``).

    The mega-batch scheme of transformers' length-grouped sampler: the same random permutation as the plain
    order (so the same rows train in the epoch's ``steps`` steps), cut into mega-batches of up to
    :data:`_MEGA_BATCH_STEPS` optimizer steps (at most a quarter of the epoch, so grouping never fixes an
    epoch's batches), each sorted by length, longest first, and cut into micro-batches of ``micro`` rows (all
    processes' rows of one micro-step, so any process count gets the same micro-batches). The micro-batches
    are then shuffled, so the order of lengths over steps stays random, and the one holding the longest row
    goes first: a batch that does not fit in memory fails at the first step, not hours in.
    """
    generator = torch.Generator().manual_seed(seed)
    used = micro * accumulation * steps
    order = torch.randperm(len(lengths), generator=generator).tolist()[:used]
    mega = micro * accumulation * max(1, min(_MEGA_BATCH_STEPS, steps // 4))
    batches = []
    for begin in range(0, used, mega):
        ranked = sorted(order[begin : begin + mega], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches += [ranked[k : k + micro] for k in range(0, len(ranked), micro)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch]


def _row_lengths(method: Any, rows: Any) -> tuple[int, ...]:
    """Each prepared row's width in a padded batch, for ``group_by_length``: ``input_ids``' length, or else the
    prompt's (``prompt_ids``) plus the longest of the row's other token lists (``chosen_ids``,
    ``rejected_ids``, ``completion_ids``, ...), which a pairwise method pads to one width."""
    lengths = []
    for index in range(len(rows)):
        row = rows[index]
        if "input_ids" in row:
            lengths.append(len(row["input_ids"]))
            continue
        others = [len(v) for k, v in row.items() if k.endswith("_ids") and k != "prompt_ids" and hasattr(v, "__len__")]
        if "prompt_ids" not in row and not others:
            raise PluginError(
                f"method {getattr(method, 'name', method)!r}: group_by_length needs each prepared row's token count, "
                f"but row {index} has no input_ids, prompt_ids or other *_ids token list (its fields: "
                f"{sorted(row)}); set group_by_length: false"
            )
        lengths.append(len(row.get("prompt_ids", ())) + max(others, default=0))
    return tuple(lengths)


def _rows_of_step(run: _Run, step: int) -> tuple[list[list[int]], int]:
    """This process's micro-batch rows of optimizer step ``step`` (a group of ``reuse`` steps shares one data step)."""
    accelerator = run.accelerator
    return _step_rows(
        step // run.reuse,
        len(run.train_rows),
        run.rows_per_micro,
        run.config.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.process_index,
        run.config.seed,
        run.lengths,
    )


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step_batches(run: _Run, micro_rows: list[list[int]]) -> list[dict]:
    """The collated (and rolled-out) micro-batches of this step. An online method's rollout gets them all at
    once; with batch_reuse > 1 the first step of a group rolls out and the next ones reuse the result, so
    each data step is trained on ``reuse`` times and no row is skipped."""
    if run.reuse > 1 and run.step % run.reuse != 0 and run.rollout_cache:
        return [_to_device(run.rollout_cache[k], run.accelerator.device) for k in range(len(micro_rows))]
    device = run.accelerator.device
    batches = [_to_device(run.method.collate([run.train_rows[i] for i in ix], run.ctx), device) for ix in micro_rows]
    rollout = optional_member(run.method, "rollout")
    if rollout:
        dist.doing("rolling out (generating completions)", run.step + 1)
        with torch.no_grad():
            batches = list(rollout(run.accelerator.unwrap_model(run.model), batches, run.ctx))
        if len(batches) != len(micro_rows):
            raise PluginError(
                f"method {run.method.name!r}: rollout returned {len(batches)} micro-batches for {len(micro_rows)}; "
                "it must return one rolled-out batch per micro-batch it is given, in order"
            )
    if run.reuse > 1:
        run.rollout_cache = dict(enumerate(batches))
    return batches


def _optimizer_step(run: _Run) -> None:
    """gradient_accumulation_steps micro-batches, then one exact, normalised parameter update."""
    accelerator, model = run.accelerator, run.model
    micro_rows, run.epoch = _rows_of_step(run, run.step)
    run.ctx.step, run.ctx.training = run.step, True
    model.train()
    step_loss = torch.zeros((), device=accelerator.device)
    step_n = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    run.ctx.micro_step = 0
    deepspeed = dist.is_deepspeed(accelerator)
    for k, batch in enumerate(_step_batches(run, micro_rows)):
        run.ctx.micro_step = k
        micro = f"micro-batch {k + 1} of {len(micro_rows)}"
        dist.doing(f"computing the loss on {micro}", run.step + 1)
        last = k == len(micro_rows) - 1
        # skip the DDP all-reduce on all but the last micro-batch (DeepSpeed's engine knows the boundary itself)
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            out = run.method.loss(model, batch, run.ctx)
        dist.doing(f"backward on {micro}", run.step + 1)
        if deepspeed:
            dist.deepspeed_backward(model, out.loss_sum, last)
        else:
            accelerator.backward(out.loss_sum)
        step_loss += out.loss_sum.detach().float()
        step_n += out.n_items.double() if isinstance(out.n_items, torch.Tensor) else float(out.n_items)
        run.window.add_metrics(out.metrics)
    if run.reuse > 1 and (run.step + 1) % run.reuse == 0:
        run.rollout_cache.clear()  # the group is done: the next step rolls out new data
    dist.doing("summing the step's item counts over processes", run.step + 1)
    # one collective for the item count, the finiteness check and a stop request (any process may see a signal)
    stop_here = torch.tensor(float(run.stop_requested is not None), dtype=torch.float64, device=accelerator.device)
    flags = torch.stack([step_n, (~torch.isfinite(step_loss)).double(), stop_here])
    total_n, non_finite, stop = accelerator.reduce(flags, reduction="sum").tolist()
    if non_finite:
        here = (
            f"loss is {step_loss.item()}" if not torch.isfinite(step_loss) else "loss is not finite on another process"
        )
        raise NonFiniteLossError(
            f"{here} at step {run.step + 1} (epoch {run.epoch}); rows of the batch on process "
            f"{accelerator.process_index}: {sorted(i for ix in micro_rows for i in ix)}. Lower learning_rate, check "
            f"those rows, or enable max_grad_norm. {_run_guard.advice(run.output_dir)}"
        )
    if stop and run.stop_requested is None:
        run.stop_requested = "a signal on another process"
    _apply_gradients(run, total_n)
    run.step += 1
    run.window.add_step(step_loss, total_n)
    run.ctx.step = run.result.global_step = run.step
    _notify_services(run)


def _upcoming_batches(run: _Run, horizon: int) -> list[UpcomingBatch]:
    """What ``ctx.upcoming_batches`` answers: the collated micro-batches (CPU) of every step in the next
    ``horizon`` that rolls out, computed by the same ``_rows_of_step`` the steps themselves will call."""
    out = []
    for step in range(run.step, min(run.step + horizon, run.total_steps)):
        if step % run.reuse:
            continue  # reuses the group's cached rollout
        micro_rows, _ = _rows_of_step(run, step)
        out.append(
            UpcomingBatch(step, [run.method.collate([run.train_rows[i] for i in ix], run.ctx) for ix in micro_rows])
        )
    return out


def _notify_services(run: _Run) -> None:
    """Tell core services (``ctx.services``) that the policy is ready for step ``run.step``."""
    for service in run.ctx.services.values():
        service.on_step(run.ctx)


def _close_services(run: _Run) -> None:
    """Stop every service (a generation worker process) however the run ends. A service that fails to close is
    reported, never raised: the run's own outcome (finished, interrupted, or its error) is what matters here."""
    for name, service in run.ctx.services.items():
        try:
            service.close()
        except Exception as exc:
            warnings.warn(f"closing the run's {name!r} service failed: {type(exc).__name__}: {exc}", stacklevel=2)


_NO_ITEMS = "no loss items in the batch (e.g. every completion truncated); skipping the update"


def _apply_gradients(run: _Run, total_n: float) -> None:
    """Scale by world_size / N, clip, step the optimizer and the schedule, clear the gradients."""
    accelerator = run.accelerator
    if dist.is_deepspeed(accelerator):
        # the engine holds the reduced gradients: it normalises, clips and steps (_distributed.deepspeed_step).
        # With no items the gradients are zeros; leaving them in the engine's buffers adds nothing to the next
        # step's, so skipping engine.step() skips the update exactly as below.
        if total_n > 0:
            run.window.grad_norms.append(dist.deepspeed_step(run.model, accelerator.num_processes, total_n))
        else:
            accelerator.print(f"step {run.step + 1}: {_NO_ITEMS}")
        run.scheduler.step()
        return
    params = [p for p in run.model.parameters() if p.requires_grad]
    if total_n > 0:
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, accelerator.num_processes / total_n)
        max_norm = run.config.max_grad_norm if run.config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        run.optimizer.step()
        run.window.grad_norms.append(tracking.deferred(grad_norm) if grad_norm is not None else float("nan"))
    else:
        accelerator.print(f"step {run.step + 1}: {_NO_ITEMS}")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


# -- log, evaluate, checkpoint -------------------------------------------------------------------------------


def _log_evaluate_save(run: _Run) -> None:
    config, step = run.config, run.step
    if step % config.logging_steps == 0 or step == run.total_steps:
        row = {"step": step, "epoch": run.epoch + 1, **run.window.reduce(run.scheduler.get_last_lr()[0])}
        run.result.log_history.append(row)
        run.callbacks.emit("on_log", run.ctx, row)
        run.bar.update(step, row)
    else:
        run.bar.update(step)
    if run.eval_rows is not None and config.eval_steps and step % config.eval_steps == 0 and step < run.total_steps:
        _evaluate_and_log(run)
    if config.save_steps and step % config.save_steps == 0 and step < run.total_steps:
        _save(run)


def _evaluate_and_log(run: _Run) -> None:
    dist.doing("evaluating", run.step)
    batch_rows = _rows_per_batch(run.method, run.config, run.config.per_device_eval_batch_size)
    metrics = evaluate(run.method, run.model, run.eval_rows, run.ctx, run.accelerator, batch_rows)
    row = {"step": run.step, **metrics}
    run.result.log_history.append(row)
    run.callbacks.emit("on_evaluate", run.ctx, row)


def _save(run: _Run) -> Path:
    dist.doing(f"saving checkpoint-{run.step}", run.step)
    path = ckpt.save_checkpoint(
        run.output_dir,
        run.step,
        accelerator=run.accelerator,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        tokenizer=run.ctx.processor or run.tokenizer,
        method=run.method,
        state={"epoch": run.epoch, "metric_totals": run.window.totals_for_checkpoint()},
        rollout_cache=run.rollout_cache,
        services={name: service.state_dict() for name, service in run.ctx.services.items()},
        save_total_limit=run.config.save_total_limit,
        sharded=dist.is_sharded(run.accelerator),
        deepspeed=dist.is_deepspeed(run.accelerator),
    )
    run.callbacks.emit("on_save", run.ctx, path)
    return path


@contextlib.contextmanager
def _stop_on_signals(run: _Run):
    """First Ctrl-C or SIGTERM (SLURM, Kubernetes, spot instances): finish the current step, checkpoint,
    stop. A second Ctrl-C stops at once. Outside the main thread the default handlers stay."""

    def request_stop(signum: int, frame: Any) -> None:
        if run.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_requested = signal.Signals(signum).name

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[sig] = signal.signal(sig, request_stop)
    try:
        yield
    except BaseException as exc:
        if signal.SIGTERM in previous and run.accelerator.num_processes > 1 and dist.is_collective_failure(exc):
            # a peer died: the launcher sends this process SIGTERM as soon as it sees that, which would end it
            # before it reports which process failed. It is ending anyway, once the report is out (or by the
            # launcher's SIGKILL after its grace period).
            previous[signal.SIGTERM] = signal.SIG_IGN
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _save_on_interrupt(run: _Run) -> None:
    run.result.interrupted, run.result.stop_signal = True, run.stop_requested
    if not run.config.save_on_interrupt:
        run.accelerator.print(
            f"interrupted at step {run.step} ({run.stop_requested}); save_on_interrupt is false, so nothing was saved "
            f"since the last checkpoint. {_run_guard.advice(run.output_dir)}"
        )
        return
    path = _save(run)
    run.accelerator.print(
        f"interrupted at step {run.step} ({run.stop_requested}); resumable checkpoint in {path}. Continue with the "
        f"same command plus --resume_from_checkpoint latest (output_dir {run.output_dir})."
    )


def _finish(run: _Run) -> None:
    """Final evaluation, then the model and tokenizer at the top of output_dir (transformers layout)."""
    if run.eval_rows is not None:
        _evaluate_and_log(run)
    accelerator = run.accelerator
    dist.doing("saving the final model", run.step)
    accelerator.wait_for_everyone()
    # sharded (FSDP2, DeepSpeed): every process sends its shards, the main process writes one consolidated model
    consolidate = dist.is_sharded(accelerator) or dist.is_deepspeed(accelerator)
    state = dist.full_state_dict(accelerator, run.model) if consolidate else None
    if accelerator.is_main_process:  # atomic, then marked complete (run_complete.json)
        _run_guard.save_final(
            run.output_dir, accelerator.unwrap_model(run.model), run.ctx.processor or run.tokenizer, run.step, state
        )  # a processor saves its tokenizer too
    accelerator.wait_for_everyone()


# -- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(method: Any, model: Any, rows: Any, ctx: TrainContext, accelerator: Any, batch_size: int) -> dict:
    """Loss (sum / count over the whole eval set) and reduced metrics, each process taking a shard.

    ``batch_size`` counts dataset rows per micro-batch.

    .. versionadded:: 0.1
    """
    was_training, ctx.training = model.training, False
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    window = tracking.LogWindow(accelerator)
    rollout = optional_member(method, "rollout")
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    n = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    # every process runs the same number of batches: under FSDP2 each forward (and each generation step) is a
    # collective, so a process that ran out of rows repeats its first batch and discards the result
    n_batches = math.ceil(len(rows) / (world * batch_size))
    try:
        for b in range(n_batches):
            start = (b * world + rank) * batch_size
            padding = start >= len(rows)
            start = rank * batch_size % len(rows) if padding else start
            chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            batch = _to_device(method.collate(chunk, ctx), accelerator.device)
            if rollout:
                batch = rollout(accelerator.unwrap_model(model), [batch], ctx)[0]
            with accelerator.autocast():
                out = method.loss(model, batch, ctx)
            if padding:
                continue
            loss_sum += out.loss_sum.double()
            n += out.n_items.double() if isinstance(out.n_items, torch.Tensor) else float(out.n_items)
            window.add_metrics(out.metrics)
        totals = accelerator.reduce(torch.stack([loss_sum, n]), "sum").tolist()
        row = {"eval_loss": totals[0] / totals[1] if totals[1] > 0 else float("nan")}
        row.update({f"eval_{name}": value for name, value in window.reduce_metrics().items()})
    finally:
        ctx.training = True
        if was_training:
            model.train()
    return row
