"""``posttrain train METHOD [--config run.yaml] [--field value ...]``."""

from __future__ import annotations

import sys

from posttrain._errors import ConfigError, PluginError


def usage(method_name: str | None, config_class: type | None) -> str:
    text = (
        "usage: posttrain train METHOD [--config run.yaml] [--model PATH] [--dataset FILE] "
        "[--output_dir DIR] [--FIELD VALUE ...]\n\nBooleans take true/false (a bare --flag means true); "
        "lists are comma-separated.\n"
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


def train_from_config(method_class, entry, config) -> int:
    from posttrain import _environment as environment
    from posttrain import _registry as registry
    from posttrain.loop import train

    reward_names = list(getattr(config, "reward_funcs", None) or [])
    rewards = registry.resolve_rewards(reward_names) if reward_names else {}
    from posttrain import _discovery as discovery

    reward_entries = [e for e in discovery.discover(("reward",)) if e.name in reward_names]
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
