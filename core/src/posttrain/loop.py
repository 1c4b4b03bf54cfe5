"""The one training loop every method uses. Read it top to bottom.

    setup: accelerator, seed, model + tokenizer, method.setup, datasets, optimizer, scheduler, resume
    while step < total_steps:
        for each micro-batch of the step (gradient accumulation):
            [rollout]  ->  loss(model, batch) -> (loss_sum, n_items)  ->  backward(loss_sum)
        scale grads by world_size / total n_items of the step (all micro-batches, all processes)
        clip -> optimizer.step -> scheduler.step -> zero_grad
        log every logging_steps, evaluate every eval_steps, checkpoint every save_steps
    save_pretrained(output_dir)

Why the gradient is scaled after backward: a method returns a *sum* and a count (the contract in
``posttrain._method``). DDP averages gradients over processes, so the summed gradient is
``world_size * mean``; multiplying by ``world_size / N`` gives exactly d(sum of all losses / N).
The count is known only after the forward passes (online methods generate first), and gradients are
linear, so scaling them once per step is exact and costs one fused multiply.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain import _checkpoint as ckpt
from posttrain import _tracking as tracking
from posttrain._errors import DataError, PosttrainError
from posttrain._method import TrainContext


@dataclass
class TrainResult:
    global_step: int
    output_dir: Path
    log_history: list[dict] = field(default_factory=list)
    interrupted: bool = False

    @property
    def final_loss(self) -> float | None:
        losses = [row["loss"] for row in self.log_history if "loss" in row]
        return losses[-1] if losses else None


class NonFiniteLossError(PosttrainError):
    """The loss became NaN or infinite; the message names the step and the rows of its batch."""


def _step_rows(step: int, n_rows: int, batch_size: int, accumulation: int, world: int, rank: int, seed: int):
    """Row indices of each micro-batch of optimizer step ``step`` on process ``rank``.

    The order is a pure function of (seed, epoch), so resuming at any step replays the same data,
    and P processes with batch B see exactly the rows one process with batch P*B sees.
    """
    global_micro = batch_size * world
    per_epoch = n_rows // (global_micro * accumulation)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    start = within * accumulation * global_micro
    return [
        order[start + k * global_micro + rank * batch_size : start + k * global_micro + (rank + 1) * batch_size]
        for k in range(accumulation)
    ], epoch


def _name_the_file(exc: Exception, path: str, method_name: str) -> None:
    """Row errors from ``method.prepare`` say "the dataset"; name the file and make the check-data hint runnable."""
    text = str(exc)
    text = text.replace("of the dataset", f"of {path}", 1) if "of the dataset" in text else f"{path}: {text}"
    for placeholder in ("check-data METHOD FILE", f"check-data {method_name} FILE"):
        text = text.replace(placeholder, f"check-data {method_name} {path}")
    exc.args = (text,)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


def _scalar(value: Any) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def _check_output_dir(output_dir: Path, config: Any, resuming: bool) -> None:
    has_run = (
        output_dir.is_dir()
        and any((output_dir / name).exists() for name in ("posttrain_config.yaml", tracking.METRICS_FILE))
    ) or bool(ckpt.list_checkpoints(output_dir))
    if has_run and not resuming and not config.overwrite_output_dir:
        raise PosttrainError(
            f"output_dir {str(output_dir)!r} already holds a run. Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir true to replace it, or choose another --output_dir."
        )


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
    """Train ``model`` with ``method`` as ``config`` says. Models/datasets not passed are loaded from the config."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    # -- setup --------------------------------------------------------------------------------------
    from transformers.utils import logging as hf_logging

    from posttrain import data as data_lib
    from posttrain import models
    from posttrain.config import save_config

    hf_logging.disable_progress_bar()  # our own bar is the one progress display
    import datasets

    datasets.disable_progress_bars()
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    # without an accelerator, cpu=True is what makes accelerate run multi-process CPU (gloo) under torchrun
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = accelerator or Accelerator(mixed_precision=mixed, cpu=config.use_cpu or not has_accelerator)
    output_dir = Path(config.output_dir)
    resume_path = ckpt.resolve_resume_path(config.resume_from_checkpoint, output_dir)
    _check_output_dir(output_dir, config, resuming=resume_path is not None)
    set_seed(config.seed)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(config.model, config.trust_remote_code)
    if model is None:
        load = getattr(method, "load_model", None)
        model = load(config) if load else models.load_causal_lm(config.model, config)
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
    )
    model.to(accelerator.device)
    if hasattr(method, "setup"):
        method.setup(ctx)

    def prepared(source: Any, split: str) -> Any:
        dataset = data_lib.load_dataset(source, split)
        path = str(source) if isinstance(source, (str, Path)) else None
        try:
            rows = method.prepare(dataset, ctx)
        except DataError as exc:
            if path:
                _name_the_file(exc, path, getattr(method, "name", "METHOD"))
            raise
        if len(rows) == 0:
            raise PosttrainError(
                f"the {split} dataset{f' {path!r}' if path else ''} has no usable rows after preparation (all "
                "filtered out; the warnings above say why, e.g. prompts longer than max_length)."
            )
        return rows

    train_rows = prepared(train_dataset if train_dataset is not None else config.dataset, config.dataset_split)
    eval_source = eval_dataset if eval_dataset is not None else config.eval_dataset
    eval_rows = prepared(eval_source, "eval") if eval_source is not None else None

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.per_device_train_batch_size * world * config.gradient_accumulation_steps
    steps_per_epoch = len(train_rows) // per_step
    if steps_per_epoch == 0:
        raise PosttrainError(
            f"the dataset has {len(train_rows)} rows but one optimizer step needs {per_step} "
            f"(per_device_train_batch_size x processes x gradient_accumulation_steps); lower them or add data."
        )
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    optimizer = _optimizer(model, config)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    step, trainer_state = 0, {}
    if resume_path is not None:
        trainer_state = ckpt.load_checkpoint(
            resume_path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, method=method
        )
        step = trainer_state["global_step"]
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "posttrain_config.yaml", getattr(method, "name", None))
        if provenance:
            import json

            (output_dir / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    callbacks = (tracking.build_loggers(config, output_dir, step if resume_path else None) if main else []) + (
        [c for c in callbacks or []] if main else []
    )
    result = TrainResult(global_step=step, output_dir=output_dir)
    ctx.step = step
    tracking.call(callbacks, "on_train_begin", ctx)
    bar = tracking.ProgressBar(
        total_steps, step, getattr(method, "name", "train"), enabled=main and not config.disable_progress_bar
    )

    # First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once.
    stop = {"requested": False}
    previous_handler = None

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    with contextlib.suppress(ValueError):  # not in the main thread: keep the default handler
        previous_handler = signal.signal(signal.SIGINT, on_sigint)

    window: dict[str, Any] = {
        "loss_sum": torch.zeros((), device=accelerator.device),
        "n": 0.0,
        "metrics": {},
        "grad_norm": [],
        "t0": time.perf_counter(),
        "steps": 0,
    }
    has_rollout = hasattr(method, "rollout")

    def save(epoch: int) -> Path:
        return _save(
            output_dir, step, accelerator, model, optimizer, scheduler, tokenizer, method, epoch, config, ctx, callbacks
        )

    try:
        while step < total_steps and not stop["requested"]:
            # -- one optimizer step over gradient_accumulation_steps micro-batches -----------------
            micro_rows, epoch = _step_rows(
                step,
                len(train_rows),
                config.per_device_train_batch_size,
                config.gradient_accumulation_steps,
                world,
                rank,
                config.seed,
            )
            ctx.step, ctx.training = step, True
            model.train()
            step_loss = torch.zeros((), device=accelerator.device)
            step_n = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            for k, indices in enumerate(micro_rows):
                ctx.micro_step = k
                batch = _to_device(method.collate([train_rows[i] for i in indices], ctx), accelerator.device)
                if has_rollout:
                    with torch.no_grad():
                        batch = method.rollout(accelerator.unwrap_model(model), batch, ctx)
                last = k == len(micro_rows) - 1
                # skip the DDP all-reduce on all but the last micro-batch
                sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    out = method.loss(model, batch, ctx)
                accelerator.backward(out.loss_sum)
                step_loss += out.loss_sum.detach().float()
                step_n += float(out.n_items) if not isinstance(out.n_items, torch.Tensor) else out.n_items.double()
                for name, value in out.metrics.items():
                    window["metrics"].setdefault(name, []).append(_scalar(value))
            total_n = accelerator.reduce(step_n, reduction="sum")
            if not torch.isfinite(step_loss):  # one host sync per step
                raise NonFiniteLossError(
                    f"loss is {step_loss.item()} at step {step + 1} (epoch {epoch}); rows of the batch on process "
                    f"{rank}: {sorted(i for ix in micro_rows for i in ix)}. Lower learning_rate, check those rows, "
                    "or enable max_grad_norm. The last good checkpoint is kept."
                )
            if total_n.item() > 0:
                scale = world / total_n.item()
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
                if config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                else:
                    grad_norm = accelerator.clip_grad_norm_(params, float("inf"))
                optimizer.step()
                window["grad_norm"].append(_scalar(grad_norm) if grad_norm is not None else float("nan"))
            else:
                accelerator.print(
                    f"step {step + 1}: no loss items in the batch (e.g. every completion truncated); "
                    "skipping the update"
                )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["loss_sum"] += step_loss
            window["n"] += float(total_n)
            window["steps"] += 1
            ctx.step = result.global_step = step

            # -- log, evaluate, checkpoint -------------------------------------------------------
            if step % config.logging_steps == 0 or step == total_steps:
                row = _log_row(accelerator, window, step, epoch + 1, scheduler)
                result.log_history.append(row)
                tracking.call(callbacks, "on_log", ctx, row)
                bar.update(step, row)
            else:
                bar.update(step)
            if eval_rows is not None and config.eval_steps and step % config.eval_steps == 0 and step < total_steps:
                _evaluate_and_log(method, model, eval_rows, ctx, accelerator, config, callbacks, result)
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                save(epoch)
        if stop["requested"] and step < total_steps:
            result.interrupted = True
            if config.save_on_interrupt:
                path = save(0)
                accelerator.print(
                    f"interrupted at step {step}; resumable checkpoint in {path} "
                    f"(continue with --resume_from_checkpoint latest)"
                )
            return result
        if eval_rows is not None:
            _evaluate_and_log(method, model, eval_rows, ctx, accelerator, config, callbacks, result)
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    # -- final model ---------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main:
        accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        tracking.call(callbacks, "on_train_end", ctx)
    accelerator.wait_for_everyone()
    return result


def _log_row(accelerator: Any, window: dict, step: int, epoch: int, scheduler: Any) -> dict:
    """Average the logging window over steps and processes; loss = sum / count, exactly."""
    loss_sum = accelerator.reduce(window["loss_sum"], reduction="sum")
    elapsed = time.perf_counter() - window["t0"]
    row: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "loss": float(loss_sum) / window["n"] if window["n"] else float("nan"),
        "learning_rate": scheduler.get_last_lr()[0],
    }
    if window["grad_norm"]:
        row["grad_norm"] = sum(window["grad_norm"]) / len(window["grad_norm"])
    row.update(_mean_metrics(accelerator, window["metrics"]))
    row["steps_per_second"] = window["steps"] / elapsed if elapsed > 0 else 0.0
    window.update(
        loss_sum=torch.zeros_like(window["loss_sum"]), n=0.0, metrics={}, grad_norm=[], t0=time.perf_counter(), steps=0
    )
    return row


def _mean_metrics(accelerator: Any, metrics: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each metric over every value reported on every process.

    Processes may report different names (a shard without rejected examples has no
    ``rewards/rejected``), so the names are unioned first and each metric is reduced as a (sum, count).
    """
    names = set(metrics)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        names = set().union(*gather_object([sorted(names)]))
    names = sorted(names)
    if not names:
        return {}
    sums = [sum(metrics.get(n, [])) for n in names]
    counts = [len(metrics.get(n, [])) for n in names]
    totals = accelerator.reduce(torch.tensor([sums, counts], device=accelerator.device, dtype=torch.float64), "sum")
    return {n: float(s / c) for n, s, c in zip(names, totals[0].tolist(), totals[1].tolist()) if c > 0}


@torch.no_grad()
def evaluate(method: Any, model: Any, rows: Any, ctx: TrainContext, accelerator: Any, batch_size: int) -> dict:
    """Loss (sum / count over the whole eval set) and mean metrics, each process taking a shard."""
    was_training, ctx.training = model.training, False
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    n = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    metrics: dict[str, list[float]] = {}
    for start in range(rank * batch_size, len(rows), world * batch_size):
        batch = _to_device(
            method.collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))], ctx), accelerator.device
        )
        if hasattr(method, "rollout"):
            batch = method.rollout(accelerator.unwrap_model(model), batch, ctx)
        with accelerator.autocast():
            out = method.loss(model, batch, ctx)
        loss_sum += out.loss_sum.double()
        n += float(out.n_items) if not isinstance(out.n_items, torch.Tensor) else out.n_items.double()
        for name, value in out.metrics.items():
            metrics.setdefault(name, []).append(_scalar(value))
    loss_sum, n = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(n, "sum")
    row = {"eval_loss": float(loss_sum / n) if n > 0 else float("nan")}
    row.update({f"eval_{name}": value for name, value in _mean_metrics(accelerator, metrics).items()})
    ctx.training = True
    if was_training:
        model.train()
    return row


def _evaluate_and_log(method, model, rows, ctx, accelerator, config, callbacks, result) -> None:
    row = {"step": ctx.step, **evaluate(method, model, rows, ctx, accelerator, config.per_device_eval_batch_size)}
    result.log_history.append(row)
    tracking.call(callbacks, "on_evaluate", ctx, row)


def _save(output_dir, step, accelerator, model, optimizer, scheduler, tokenizer, method, epoch, config, ctx, callbacks):
    path = ckpt.save_checkpoint(
        output_dir,
        step,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        method=method,
        state={"epoch": epoch},
        save_total_limit=config.save_total_limit,
    )
    tracking.call(callbacks, "on_save", ctx, path)
    return path
