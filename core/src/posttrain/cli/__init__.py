"""``posttrain`` command line. This module imports only the standard library; each command's
module is imported when that command runs, so ``posttrain list`` and ``--help`` stay fast.

Installed packages add commands through the ``posttrain.commands`` entry-point group
(``name = "module:function"``, the function takes ``argv`` and returns an exit code); ``--help``
lists them from metadata alone (:mod:`posttrain.cli.plugin_commands`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

COMMANDS = {
    "list": ("posttrain.cli.listing", "List installed methods, rewards, plugins and commands with their status."),
    "info": ("posttrain.cli.info", "Show a method's package, status, docs and config fields."),
    "train": (
        "posttrain.cli.train",
        "Train a model with a method: posttrain train METHOD --model PATH --dataset FILE.",
    ),
    "check-data": (
        "posttrain.cli.check_data",
        "Validate a dataset file against a method's format, before any model loads.",
    ),
    "schema": ("posttrain.cli.schema", "Print the JSON Schema of a method's config (editors validate run.yaml)."),
    "generate": (
        "posttrain.cli.generate",
        "Generate text from a model directory: posttrain generate DIR --prompt TEXT.",
    ),
    "chat": ("posttrain.cli.chat", "Chat with a model directory in the terminal."),
    "install": ("posttrain.cli.install", "Install plugin packages (by name, path or URL), keeping the core as it is."),
    "uninstall": ("posttrain.cli.uninstall", "Uninstall plugin packages."),
    "doctor": ("posttrain.cli.doctor", "Import every plugin in a subprocess and report problems."),
    "env": ("posttrain.cli.env", "Print versions and hardware, for bug reports."),
    "new": ("posttrain.cli.new", "Scaffold a new method package."),
    "promote": ("posttrain.cli.promote", "Check the promotion criteria and promote a method package to stable."),
    "demote": ("posttrain.cli.promote", "Mark a stable method package experimental again (or retire it)."),
    "demo": ("posttrain.cli.demo", "Run the end-to-end demo: tiny model, SFT then GRPO, on CPU in minutes."),
    "plot": ("posttrain.cli.plot", "Render a run's metrics.jsonl to a PNG."),
    "cache": ("posttrain.cli.cache", "List, size or clear the prepared-data cache (tokenized rows runs reuse)."),
}

# Shell convention for a process stopped by SIGPIPE (128 + 13): `posttrain list | head -3`.
EXIT_BROKEN_PIPE = 141


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("posttrain")
    except PackageNotFoundError:
        return "0.0.0"


def _plugin_commands_epilog() -> str:
    """The commands installed packages add, read from metadata (nothing is imported)."""
    from posttrain.cli import plugin_commands

    lines = []
    for entry in plugin_commands.discover():
        if entry.usable:
            text = f"{entry.summary} [{entry.package} {entry.version}]"
        else:
            text = f"unavailable ({entry.status}): {entry.reason} [{entry.package} {entry.version}]"
        wrapped = textwrap.wrap(text, width=100, initial_indent=f"  {entry.name:<14}", subsequent_indent=" " * 16)
        lines += wrapped
    if not lines:
        return ""
    return "commands from installed packages:\n" + "\n".join(lines)


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description=textwrap.fill(
            "Post-training for language models. Methods are installed as separate packages; "
            "`posttrain list` shows what is installed, `posttrain install NAME` adds one.",
            100,
        ),
        epilog=_plugin_commands_epilog() if with_plugins else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _dispatch(argv: list[str]) -> int:
    from posttrain._errors import PosttrainError

    command = argv[0] if argv else ""
    try:
        if command and command not in COMMANDS and not command.startswith("-"):
            from posttrain.cli import plugin_commands

            entry = plugin_commands.resolve(command)  # None: not a command any package provides
            if entry is not None:
                return plugin_commands.run(entry, argv[1:])
        if command not in COMMANDS:
            parser = build_parser()
            args = parser.parse_args(argv)  # handles --help and unknown commands
            if args.version:
                print(f"posttrain {_version()}")
            elif args.command is None:
                parser.print_help()
            return 0
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.run(command, argv[1:]) or 0)
    except PosttrainError as exc:  # user errors: one line, no traceback
        print(f"posttrain {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _dispatch(argv)
        finally:  # argparse's --help exits through here too
            sys.stdout.flush()  # a reader that went away (`| head`) shows up here, not at interpreter exit
    except BrokenPipeError:
        # The reader closed the pipe: nothing more can be shown, so stop quietly. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
