"""Run configuration: dataclasses loaded from YAML and ``--key value`` flags.

Every method has one flat config dataclass that extends :class:`TrainingConfig` with its own fields.
Field names follow transformers/TRL where the concept is the same, so a TRL user's YAML mostly
works unchanged. Unknown keys fail with a "did you mean"; wrong types name the field; all problems
are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain._errors import ConfigError

__all__ = [
    "TrainingConfig",
    "build_config",
    "config_to_dict",
    "describe_fields",
    "load_config",
    "parse_cli_overrides",
    "save_config",
]

SchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup"]


@dataclass
class TrainingConfig:
    """Fields every method shares. A method's config adds its own fields and paper defaults.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 ``freeze`` (vision-language models).
    .. versionchanged:: 1.1 ``group_by_length``.
    .. versionchanged:: 1.1 ``prepare_cache``, ``prepare_cache_dir``.
    """

    # -- what to train on
    model: str = ""  # local directory (or hub name) of a causal LM
    dataset: str = ""  # JSON/JSONL/CSV/Parquet file, a saved `datasets` directory, or a hub name
    dataset_split: str = "train"
    eval_dataset: str | None = None  # same forms as `dataset`; evaluated every eval_steps
    prepare_cache: bool = True  # reuse the prepared rows of a run with the same data, tokenizer, code and config
    prepare_cache_dir: str | None = None  # None -> $POSTTRAIN_CACHE/prepared or ~/.cache/posttrain/prepared
    output_dir: str = "output"
    overwrite_output_dir: bool = False  # allow writing over a directory that holds another run
    # -- optimisation
    learning_rate: float = 5e-5
    lr_scheduler_type: SchedulerType = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # rows of similar length share a micro-batch (less padding); steps stay in random order (docs: training loop)
    group_by_length: bool = False
    # -- model and precision
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # weights as loaded
    bf16: bool = False  # autocast to bfloat16 (needs hardware support)
    fp16: bool = False  # autocast to float16 with loss scaling (CUDA)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    use_cpu: bool = False  # train on CPU even when an accelerator is present
    torch_compile: bool = False
    ddp_timeout: int = 1800  # seconds a process waits for the others in a collective before failing with a report
    # vision-language models: parts that do not train (with use_peft: parts that get no adapters)
    freeze: Literal["none", "vision", "vision_and_projector"] = "none"  # none, the vision tower, or tower + projector
    # -- LoRA (needs `pip install posttrain[peft]`)
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None -> all linear layers
    # -- logging, evaluation, checkpoints
    logging_steps: int = 10
    eval_steps: int = 0  # 0 -> evaluate only at the end (when eval_dataset is set)
    save_steps: int = 500  # 0 -> no intermediate checkpoints
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    save_on_interrupt: bool = True  # Ctrl-C writes a resumable checkpoint
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest" in output_dir
    resume_override: list[str] = field(default_factory=list)  # fields a resumed run may change (see failure-modes)
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard", "wandb"]; metrics.jsonl is always written
    tracker_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tracker, e.g. {wandb: {project: x}}
    disable_progress_bar: bool = False
    allow_inactive: bool = False  # use a retired (7 - Inactive) method anyway

    def problems(self) -> list[str]:
        """Problems a field-by-field type check cannot see. Methods extend this list."""
        found = []
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
        found += [f"{name} must be >= 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.max_steps == 0 or self.max_steps < -1:
            found.append(f"max_steps must be > 0 (or -1 to use num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            found.append(f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs}")
        if self.learning_rate < 0:
            found.append(f"learning_rate must be >= 0, got {self.learning_rate}")
        for name in ("logging_steps",):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ddp_timeout < 1:
            found.append(f"ddp_timeout must be >= 1 (seconds), got {self.ddp_timeout}")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.bf16 and self.fp16:
            found.append("bf16 and fp16 are both true; choose one mixed-precision mode")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            found.append(f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        if not 0 <= self.seed < 2**32:
            found.append(f"seed must be in [0, 2**32 - 1] (numpy's range), got {self.seed}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("adam_epsilon", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            found.append(f"lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}")
        for name, options in self.tracker_options.items():  # each tracker plugin checks the keys of its own
            if not isinstance(options, dict):
                found.append(f"tracker_options.{name} must be a mapping of option: value, got {options!r}")
        return found


# -- rules every field gets, in every method's config ------------------------------------------------------

#: Float fields named like this are probabilities or shares: [0, 1].
_UNIT_INTERVAL = ("top_p", "min_p", "lmbda")
_UNIT_SUFFIXES = ("_dropout", "_prob", "_probability", "_ratio", "_utilization")


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, float)]
    return []


def generic_problems(config: Any) -> dict[str, str]:
    """Rules that hold for a field of any method by its type and name, so every plugin gets them for free.

    - every float (alone or in a list) is finite: NaN and infinity are refused;
    - probabilities and shares (``top_p``, ``min_p``, ``*_dropout``, ``*_prob``, ``*_ratio``, ...) lie in [0, 1];
    - ``temperature`` is > 0; token lengths (``max_length``, ``max_*_length``) are >= 1, and ``max_length``
      >= 2 (a prompt token and a completion token).
    """
    import math

    found: dict[str, str] = {}  # field -> problem
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        bad = [v for v in _floats(value) if not math.isfinite(v)]
        if bad:
            found[f.name] = f"{f.name} must be a finite number, got {bad[0]}"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (f.name in _UNIT_INTERVAL or f.name.endswith(_UNIT_SUFFIXES)) and not 0 <= value <= 1:
            found[f.name] = f"{f.name} must be in [0, 1] (a probability or share), got {value}"
        if f.name == "temperature" and value <= 0:
            found[f.name] = f"temperature must be > 0 (logits are divided by it), got {value}"
        if f.name == "max_length" and value < 2:
            found[f.name] = f"max_length must be >= 2 (one prompt token and one completion token), got {value}"
        elif f.name.startswith("max_") and f.name.endswith("_length") and isinstance(value, int) and value < 1:
            found[f.name] = f"{f.name} must be >= 1, got {value}"
    return found


def config_problems(config: Any) -> list[str]:
    """The config's own :meth:`TrainingConfig.problems`, plus the generic rules for the fields they do not cover.

    A config's own problems name their field first (the convention every method follows), so a field the
    method already reports is not reported twice; the method's message, which knows the method, wins.
    """
    generic = generic_problems(config)
    check = getattr(config, "problems", None)  # TrainingConfig's cross-field checks; plain options have none
    try:
        own = check() if callable(check) else []
    except (TypeError, ValueError) as exc:  # a method's rule tripped over a value the generic rules refuse
        own = [] if generic else [f"the configuration could not be checked ({type(exc).__name__}: {exc})"]
    covered = {problem.split(" ", 1)[0] for problem in own}
    return [p for name, p in generic.items() if name not in covered] + own


# -- loading -----------------------------------------------------------------------------------------


def _hints(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def _coerce(name: str, value: Any, hint: Any, from_cli: bool) -> Any:
    """Convert ``value`` to the type ``hint`` names, or raise ValueError with a readable reason."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg, from_cli)
            except ValueError as exc:
                errors.append(str(exc))
        if len(errors) < 2:
            raise ValueError(errors[0] if errors else f"expected {hint}")
        # every alternative refused it: say them all (bool | Literal["auto"]: "true or false, or 'auto'")
        wanted = [e.split(", got ")[0].removeprefix("expected ") for e in errors]
        choices = [str(a) for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"expected {', or '.join(wanted)}, got {value!r}{hint_text}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}{hint_text}")
    if origin in (list, tuple):
        (item,) = args[:1] or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml

                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, v, item, from_cli=isinstance(v, str)) for v in value]
    if origin is dict or hint is dict:
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads 1e-5 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    return value


def parse_cli_overrides(argv: list[str]) -> dict[str, str | bool]:
    """``["--lr", "1e-5", "--flag", "--k=v"]`` -> ``{"lr": "1e-5", "flag": True, "k": "v"}``.

    .. versionadded:: 0.1
    """
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options look like --name value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            out[key.replace("-", "_")] = value
            i += 1
            continue
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[key.replace("-", "_")] = argv[i + 1]
            i += 2
        else:
            out[key.replace("-", "_")] = True  # a bare --flag means true
            i += 1
    return out


def build_config(config_class: type, values: dict[str, Any], source: str | None = None, from_cli: bool = False):
    """Instantiate ``config_class`` from raw values, reporting every problem at once.

    .. versionadded:: 0.1
    """
    hints = _hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    problems, kwargs = [], {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; {config_class.__name__} has no such field, so remove it (`posttrain train METHOD --help` "
                "lists the fields)"
            )
            problems.append(f"unknown key {key!r} for {config_class.__name__}{hint}")
            continue
        try:
            kwargs[key] = _coerce(key, value, hints[key], from_cli and isinstance(value, str))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise ConfigError(problems, source)
    config = config_class(**kwargs)
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def build_options(options_class: type, values: dict[str, Any], source: str) -> Any:
    """A plugin's options dataclass (a reward's, a tracker's) from raw values, checked like a config:
    unknown keys get a "did you mean", values are coerced to the field types, every problem is reported."""
    return build_config(options_class, values, source)


def load_config(config_class: type, yaml_path: str | os.PathLike | None = None, overrides: dict | None = None):
    """YAML file first, then ``overrides`` (CLI flags) on top. Raises :class:`ConfigError`.

    .. versionadded:: 0.1
    """
    values: dict[str, Any] = {}
    source = None
    if yaml_path:
        import yaml

        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; check the path given to --config")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of field: value, got {type(loaded).__name__}")
        loaded.pop("method", None)  # saved configs record their method; it is not a field
        values.update(loaded)
        source = str(path)
    cli = overrides or {}
    hints = _hints(config_class)
    problems = []
    for key, value in cli.items():
        if key in hints:
            try:
                values[key] = _coerce(key, value, hints[key], from_cli=isinstance(value, str))
            except ValueError as exc:
                problems.append(f"--{key}: {exc}")
        else:
            values[key] = value
    if problems:
        raise ConfigError(problems, "command line")
    return build_config(config_class, values, source or ("command line" if cli else None))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (field name -> value), as :func:`save_config` writes it.

    .. versionadded:: 0.1
    """
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike, method: str | None = None) -> None:
    """Write the resolved config as YAML (atomically), loadable again with ``--config``.

    .. versionadded:: 0.1
    """
    import yaml

    data = {"method": method} if method else {}
    data.update(config_to_dict(config))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def describe_fields(config_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field, help taken from the source's trailing comments.

    .. versionadded:: 0.1
    """
    import inspect

    comments: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            stripped = line.strip()
            if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
                name = stripped.split(":", 1)[0].strip()
                if name.isidentifier():
                    comments[name] = stripped.split("#", 1)[1].strip()
    out = []
    for f in dataclasses.fields(config_class):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append((f.name, str(type_name), default, comments.get(f.name, "")))
    return out
