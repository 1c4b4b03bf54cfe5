"""Commands that installed packages add to ``posttrain``.

A package declares them statically, so ``posttrain --help`` and ``posttrain list`` show them (with
the providing package) without importing anything::

    [project.entry-points."posttrain.commands"]
    export-gguf = "acme_tools.cli:export_gguf"      # def export_gguf(argv: list[str]) -> int

The entry-point name is the command name. A built-in command always wins over a package's command
of the same name (the package's is marked ``conflict``); two packages providing one name is an error
naming both, resolved by ``posttrain PACKAGE:NAME`` or by uninstalling one. A command that fails to
import is reported in one line naming its package; only running it imports it.
"""

from __future__ import annotations

import sys
import traceback

from posttrain import _discovery as discovery
from posttrain._errors import PluginError


def builtin_names() -> set[str]:
    from posttrain.cli import COMMANDS

    return set(COMMANDS)


def mark_builtin_conflicts(entries: list[discovery.Entry]) -> None:
    """A package command named like a built-in one can never run: show it as a conflict."""
    builtins = builtin_names()
    for e in entries:
        if e.kind == "command" and e.name in builtins:
            e.status = discovery.CONFLICT
            e.reason = (
                f"{e.name!r} is a built-in posttrain command, so {e.package}'s command of that name can never run; "
                f"{e.package} must rename its posttrain.commands entry point"
            )


def discover() -> list[discovery.Entry]:
    """Every ``posttrain.commands`` entry point, with status, conflicts and built-in clashes."""
    entries = discovery.discover(("command",))
    mark_builtin_conflicts(entries)
    return entries


def resolve(name: str) -> discovery.Entry | None:
    """The usable entry for ``name`` (``package:name`` picks a provider), or None when no package has it.

    Raises PluginError for a conflict, a broken or incompatible package, or a command the plugin index
    knows but that is not installed.
    """
    entries = discover()
    plain = name.split(":", 1)[-1]
    if ":" not in name and not any(e.name == plain for e in entries):
        from posttrain.cli.plugin_index import not_installed_message

        message = not_installed_message("command", plain)
        if message:
            raise PluginError(message)
        return None
    return discovery.find("command", name, entries)


def load(entry: discovery.Entry):
    """Import the command's function; any failure is the one-line PluginError every plugin gets."""
    from posttrain._registry import reported

    with reported(entry, "to import"):
        func = discovery.load(entry)
    if not callable(func):
        raise PluginError(
            f"command {entry.name!r} from {entry.package} {entry.version} names {entry.value}, which is a "
            f"{type(func).__name__}, not a function; posttrain.commands entry points must name a function "
            "taking argv and returning an exit code. Report this to the package's authors."
        )
    return func


def run(entry: discovery.Entry, argv: list[str]) -> int:
    """Run a package's command. Its user errors print one line; its bugs keep their traceback, with a
    last line saying which package to report them to."""
    from posttrain._errors import PosttrainError

    func = load(entry)
    try:
        result = func(argv)
    except (PosttrainError, KeyboardInterrupt, BrokenPipeError):
        raise
    except SystemExit as exc:  # argparse inside the command (--help, a usage error) or sys.exit(...)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception as exc:
        traceback.print_exc()
        docs = f" ({entry.docs_url})" if entry.docs_url else ""
        print(
            f"posttrain {entry.name}: error: the command from {entry.package} {entry.version} crashed with "
            f"{type(exc).__name__}: {exc}. This is a bug in {entry.package}, not in your input as far as posttrain "
            f"can tell; report it with the traceback above to its authors{docs}.",
            file=sys.stderr,
        )
        return 1
    return int(result or 0)
