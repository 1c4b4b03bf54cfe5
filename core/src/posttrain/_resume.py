"""What a resumed run may change, and applying what it changes in full.

A checkpoint continues the run recorded in ``posttrain_config.yaml`` beside it. Resuming with other values
would otherwise be half-applied (the optimizer and scheduler states carry the old learning rate and betas
while the saved config records the new ones), so a resumed run:

- may change the fields of :data:`SAFE_TO_CHANGE` freely (where and how often it logs, evaluates and saves);
- refuses any other change, listing each field with its old and new value, unless the field is named in
  ``--resume_override`` (then it applies from the resumed step on, with a warning, and is recorded);
- refuses a ``max_steps`` (or an epoch count) that ends at or before the checkpoint's step, or before the
  step a finished run reached, instead of overwriting the finished model.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError, PosttrainError

#: Fields that change nothing about the training arithmetic; a resumed run may change them without a flag.
SAFE_TO_CHANGE = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "resume_override",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "save_on_interrupt",
        "per_device_eval_batch_size",
        "eval_dataset",
        "report_to",
        "tracker_options",
        "disable_progress_bar",
        "allow_inactive",
        "torch_compile",
        "ddp_timeout",
        "prepare_cache",
        "prepare_cache_dir",
    }
)
_PATH_FIELDS = ("model", "dataset", "eval_dataset")


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if name in _PATH_FIELDS and isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        if a.exists() and b.exists() and a.resolve() == b.resolve():  # ./model and /abs/model
            return True
        from posttrain._prepare_cache import _file_digest

        return a.is_file() and b.is_file() and _file_digest(a) == _file_digest(b)  # a dataset moved, not changed
    return False


def changes(saved: dict, config: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs from the saved config (fields the saved config lacks are not compared)."""
    current = dataclasses.asdict(config)
    return {
        name: (saved[name], value)
        for name, value in current.items()
        if name in saved and name not in SAFE_TO_CHANGE and not _same(name, saved[name], value)
    }


def check(config: Any, checkpoint: Path, method_name: str | None) -> None:
    """Refuse a resume whose configuration differs from the saved one in a field not named by resume_override."""
    import yaml

    overrides = list(getattr(config, "resume_override", None) or [])
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = [name for name in overrides if name not in fields]
    if unknown:
        raise ConfigError(
            f"resume_override names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a field of "
            f"{type(config).__name__}; list the fields whose new value the resumed run should apply"
        )
    saved_file = checkpoint.parent / "posttrain_config.yaml"
    step = _checkpoint_step(checkpoint)
    if not saved_file.is_file():
        warnings.warn(
            f"{saved_file} is missing, so the configuration of the run that wrote {checkpoint} cannot be compared "
            "with this one; make sure learning_rate, batch sizes, max_steps, dataset and model are the same.",
            RuntimeWarning,
            stacklevel=3,
        )
        saved = {}
    else:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    saved_method = saved.pop("method", None)
    if saved_method and method_name and saved_method != method_name:
        raise PosttrainError(
            f"{checkpoint} was written by a {saved_method!r} run; it cannot be resumed with method {method_name!r}. "
            f"Resume it with `posttrain train {saved_method} ...`, or start a new run with --model {checkpoint}."
        )
    found = changes(saved, config)
    refused = {k: v for k, v in found.items() if k not in overrides}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"resuming {checkpoint} with a configuration that differs from the run's ({listed}). A resumed run "
            f"continues the saved one: use the saved values (posttrain_config.yaml in {checkpoint.parent}), or pass "
            f"--resume_override {','.join(refused)} to apply the new values from step {step} on"
        )
    applied = {k: v for k, v in found.items() if k in overrides}
    if applied:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in applied.items())
        warnings.warn(
            f"resuming {checkpoint} with changed settings, as resume_override asks: {listed}. They apply from step "
            f"{step} on and are recorded in posttrain_config.yaml.",
            UserWarning,
            stacklevel=3,
        )
    if getattr(config, "max_steps", -1) > 0:
        check_total_steps(config.max_steps, checkpoint)


def _checkpoint_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint.name.rsplit("-", 1)[-1].isdigit() else 0


def check_total_steps(total_steps: int, checkpoint: Path) -> None:
    """Refuse a resumed run that would train no step, or would redo steps of a finished run over its model."""
    from posttrain import _run_guard

    step = _checkpoint_step(checkpoint)
    finished = _run_guard.read_completion(checkpoint.parent)
    done = max(step, int(finished.get("global_step") or 0)) if finished else step
    if total_steps <= done:
        what = (
            f"the run in {checkpoint.parent} finished at step {done}" if finished else f"{checkpoint} is at step {step}"
        )
        raise PosttrainError(
            f"the run would end at step {total_steps}, but {what}: there is nothing left to train, and finishing "
            f"again would overwrite its model. To train longer, raise --max_steps above {done} and add "
            "--resume_override max_steps."
        )


def apply_hyperparameters(optimizer: Any, scheduler: Any, config: Any) -> None:
    """After loading a checkpoint, make the optimizer and the schedule follow ``config``.

    ``optimizer.load_state_dict`` restores the saved learning rate, betas, eps and weight decay along with
    the moments, and the scheduler its base learning rates. Setting them from the config makes an override
    take effect in full; when nothing changed the values are the same numbers, so resume stays exact.
    """
    base = config.learning_rate
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        group["initial_lr"] = base
        group["betas"] = (config.adam_beta1, config.adam_beta2)
        group["eps"] = config.adam_epsilon
        group["weight_decay"] = config.weight_decay if i == 0 else 0.0  # group 1: biases and norms, no decay
    scheduler.base_lrs = [base] * len(groups)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:  # LambdaLR: lr = base * factor(step), as the scheduler itself computes it
        for group, factor in zip(groups, lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
