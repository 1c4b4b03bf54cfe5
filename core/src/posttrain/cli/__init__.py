"""``posttrain`` command line. This module imports only the standard library; each command's
module is imported when that command runs, so ``posttrain list`` and ``--help`` stay fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "list": ("posttrain.cli.listing", "List installed methods, rewards and plugins with their status."),
    "info": ("posttrain.cli.info", "Show a method's package, status, docs and config fields."),
    "train": (
        "posttrain.cli.train",
        "Train a model with a method: posttrain train METHOD --model PATH --dataset FILE.",
    ),
    "check-data": (
        "posttrain.cli.check_data",
        "Validate a dataset file against a method's format, before any model loads.",
    ),
    "doctor": ("posttrain.cli.doctor", "Import every plugin in a subprocess and report problems."),
    "env": ("posttrain.cli.env", "Print versions and hardware, for bug reports."),
    "new": ("posttrain.cli.new", "Scaffold a new method package."),
    "promote": ("posttrain.cli.promote", "Check the promotion criteria and promote a method package to stable."),
    "demote": ("posttrain.cli.promote", "Mark a stable method package experimental again (or retire it)."),
    "demo": ("posttrain.cli.demo", "Run the end-to-end demo: tiny model, SFT then GRPO, on CPU in minutes."),
    "plot": ("posttrain.cli.plot", "Render a run's metrics.jsonl to a PNG."),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("posttrain")
    except PackageNotFoundError:
        return "0.0.0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for language models. Methods are installed as separate packages; "
        "`posttrain list` shows what is installed.",
    )
    parser.add_argument("--version", action="store_true", help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        args = parser.parse_args(argv)  # handles --help and unknown commands
        if args.version:
            print(f"posttrain {_version()}")
        elif args.command is None:
            parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    from posttrain._errors import PosttrainError

    try:
        return int(module.run(command, rest) or 0)
    except PosttrainError as exc:  # user errors: one line, no traceback
        print(f"posttrain {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
