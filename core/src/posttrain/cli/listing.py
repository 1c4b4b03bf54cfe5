"""``posttrain list``: what is installed, from metadata only (standard library imports only)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from posttrain import _discovery as discovery
from posttrain.cli import plugin_commands

PROBLEMS = (discovery.BROKEN, discovery.INCOMPATIBLE, discovery.CONFLICT)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain list", description="List installed methods, rewards and plugins.")
    p.add_argument(
        "--status",
        choices=["stable", "experimental", "inactive", "broken", "incompatible", "conflict"],
        help="show only entries with this status",
    )
    p.add_argument("--kind", choices=["method", "reward", "plugin", "command", "all"], default="all")
    p.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    p.add_argument("--all", action="store_true", help="include inactive (retired) packages")
    p.add_argument("--verbose", "-v", action="store_true", help="show entry-point values, core ranges and reasons")
    p.add_argument("--check", action="store_true", help="exit 1 when any entry is broken, incompatible or in conflict")
    return p


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [*rows, headers]) for i in range(len(headers))]
    try:
        term = os.get_terminal_size().columns
    except OSError:  # not a terminal
        term = int(os.environ.get("COLUMNS", 120))
    overflow = sum(widths) + 2 * (len(widths) - 1) - term
    if overflow > 0:  # trim the last column (summary / reason) to the terminal
        widths[-1] = max(10, widths[-1] - overflow)
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        cells = [str(c) if len(str(c)) <= w else str(c)[: w - 1] + "…" for c, w in zip(r, widths)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def run(command: str, argv: list[str]) -> int:
    args = parser().parse_args(argv)
    kinds = ("method", "reward", "plugin", "command") if args.kind == "all" else (args.kind,)
    entries = discovery.discover(kinds)
    plugin_commands.mark_builtin_conflicts(entries)
    everything = list(entries)  # --check looks at every entry, whatever --status or --all hide from the table
    if not args.all and args.status != "inactive":
        entries = [e for e in entries if e.status != discovery.INACTIVE]
    if args.status:
        entries = [e for e in entries if e.status == args.status]
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    elif not entries:
        print(
            "No posttrain methods installed. Install one, e.g. `posttrain install sft`; "
            "the plugin directory in the docs lists the packages."
            if not args.status
            else f"No {args.status} entries."
        )
    else:
        for kind in kinds:
            group = [e for e in entries if e.kind == kind]
            if not group:
                continue
            title = {"method": "Methods", "reward": "Rewards", "plugin": "Plugins", "command": "Commands"}[kind]
            headers = [kind, "package", "version", "status", "compat", "summary"]
            rows = []
            for e in group:
                compat = "no" if e.status == discovery.INCOMPATIBLE else "yes"
                if e.requires_core and args.verbose:
                    compat += f" ({e.requires_core})"
                note = e.reason if e.status in PROBLEMS else e.summary
                if args.verbose:
                    note = f"{note}  [{e.value}]"
                rows.append([e.name, e.package, e.version, e.status, compat, note])
            print(f"{title}:")
            print(_table(rows, headers))
            print()
    if args.check and any(e.status in PROBLEMS for e in everything):
        bad = [e for e in everything if e.status in PROBLEMS]
        print(
            f"{len(bad)} problem(s): " + "; ".join(f"{e.name} ({e.package}): {e.reason}" for e in bad), file=sys.stderr
        )
        return 1
    return 0
