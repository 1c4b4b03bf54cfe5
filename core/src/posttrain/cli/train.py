"""``posttrain train METHOD [--config run.yaml] [--field value ...]``."""

from __future__ import annotations

import sys

from posttrain._errors import ConfigError, PluginError

#: flags that go to ``accelerate launch`` (with --accelerate_config), never to the training config
LAUNCH_FLAGS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def usage(method_name: str | None, config_class: type | None) -> str:
    text = (
        "usage: posttrain train METHOD [--config run.yaml] [--model PATH] [--dataset FILE] "
        "[--output_dir DIR] [--FIELD VALUE ...]\n"
        "       [--accelerate_config NAME|FILE [--num_processes N] [--num_machines M] [--machine_rank R] "
        "[--main_process_ip IP] [--main_process_port P]]\n\nBooleans take true/false (a bare --flag means true); "
        "lists are comma-separated.\n--accelerate_config starts the run under `accelerate launch --config_file`: "
        f"a file, or a shipped config ({', '.join(shipped_launch_configs())}; see docs/distributed.md).\n"
    )
    if config_class is not None:
        from posttrain.config import describe_fields

        text += f"\nFields of {config_class.__name__} ({method_name}):\n"
        for name, type_name, default, help_text in describe_fields(config_class):
            text += f"  --{name} ({type_name}, default {default!r})  {help_text}\n"
    else:
        text += "\nRun `posttrain train METHOD --help` for a method's fields, `posttrain list` for methods.\n"
    return text


def run(command: str, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(None, None))
        return 0
    method_name, rest = argv[0], argv[1:]
    launch, rest = split_launch_args(rest)
    if launch is not None and not ("-h" in rest or "--help" in rest):
        return relaunch(method_name, rest, launch)
    from posttrain import _registry as registry
    from posttrain import config as config_lib

    # inactive methods are refused below, once the config says whether allow_inactive is true (flag or YAML);
    # --help needs no hook plugins, so none are imported for it
    wants_help = "-h" in rest or "--help" in rest
    method_class, entry = registry.resolve_method(method_name, allow_inactive=True, hooks=not wants_help)
    if wants_help:
        print(usage(method_name, method_class.config_class))
        return 0
    overrides = config_lib.parse_cli_overrides(rest)
    yaml_path = overrides.pop("config", None)
    if yaml_path is True:
        raise ConfigError("--config needs a file path")
    try:
        config = config_lib.load_config(method_class.config_class, yaml_path, overrides)
    except ConfigError as exc:  # make the --help hint runnable as printed
        exc.args = (str(exc).replace("train METHOD --help", f"train {method_name} --help"),)
        raise
    if entry is not None and entry.declared_status == "inactive" and not config.allow_inactive:
        raise PluginError(
            f"method {entry.name!r} from {entry.package} {entry.version} is inactive (retired); "
            "pass --allow_inactive true (or allow_inactive: true in the YAML) to use it anyway."
        )
    return train_from_config(method_class, entry, config)


def shipped_launch_configs() -> list[str]:
    """Names of the accelerate configs shipped in ``posttrain/configs/launch`` (``fsdp2`` -> fsdp2.yaml)."""
    return sorted(p.stem for p in _launch_dir().glob("*.yaml"))


def _launch_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "configs" / "launch"


def split_launch_args(argv: list[str]) -> tuple[dict[str, str] | None, list[str]]:
    """Take ``--accelerate_config`` and the launcher flags out of ``argv``; ``None`` when it is absent."""
    launch: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in ("accelerate_config", *LAUNCH_FLAGS):
            value = inline or (argv[i + 1] if i + 1 < len(argv) and not inline else "")
            if not value or value.startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            launch[name] = value
            i += 1 if inline else 2
            continue
        rest.append(arg)
        i += 1
    if not launch:
        return None, argv
    if "accelerate_config" not in launch:
        flags = ", ".join(f"--{k}" for k in launch)
        raise ConfigError(
            f"{flags} configure the launcher: pass them with --accelerate_config NAME|FILE, or run "
            "`accelerate launch ... -m posttrain train ...` / `torchrun ... -m posttrain train ...` yourself."
        )
    return launch, rest


def resolve_launch_config(value: str):
    """A file path, or the name of a shipped config (``fsdp2``, ``zero3-2nodes``...)."""
    from pathlib import Path

    path = Path(value)
    if path.is_file():
        return path
    shipped = _launch_dir() / f"{value.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"--accelerate_config {value!r}: no such file, and not a shipped config (one of "
        f"{', '.join(shipped_launch_configs())})."
    )


def relaunch(method_name: str, rest: list[str], launch: dict[str, str]) -> int:
    """Start ``accelerate launch --config_file FILE [launcher flags] -m posttrain train METHOD ...``; it starts
    the processes (locally, or this machine's share of a multi-node run), each of which runs the loop."""
    import subprocess

    config_file = resolve_launch_config(launch.pop("accelerate_config"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    for name, value in launch.items():
        command += [f"--{name}", value]
    command += ["-m", "posttrain", "train", method_name, *rest]
    print("launching: " + " ".join(command[1:]), file=sys.stderr)
    return subprocess.call(command)


def train_from_config(method_class, entry, config) -> int:
    from posttrain import _environment as environment
    from posttrain import _registry as registry
    from posttrain.loop import train

    reward_names = list(getattr(config, "reward_funcs", None) or [])
    rewards = registry.resolve_rewards(reward_names) if reward_names else {}
    from posttrain import _discovery as discovery

    reward_entries = [e for e in discovery.discover(("reward",)) if e.name in reward_names]
    reward_entries += environment.environment_entries(config)  # the environment, when the run plays one
    method = registry.instantiate(method_class, getattr(entry, "name", None) or getattr(method_class, "name", "?"))
    result = train(
        method,
        config,
        rewards=rewards,
        callbacks=registry.callbacks_for(config),
        provenance=environment.provenance(entry, reward_entries),
    )
    final = result.final_loss
    loss = f", final loss {final:.4f}" if final is not None else ""
    if result.interrupted:
        print(
            f"interrupted: {result.global_step} steps{loss}; checkpoints and metrics in {result.output_dir}",
            file=sys.stderr,
        )
        return 143 if result.stop_signal == "SIGTERM" else 130  # 128 + the signal number, as a shell reports it
    print(f"done: {result.global_step} steps{loss}; model and metrics in {result.output_dir}", file=sys.stderr)
    return 0
