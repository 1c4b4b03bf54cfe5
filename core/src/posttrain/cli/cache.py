"""``posttrain cache list|size|clear``: the prepared-data cache (tokenized rows reused by later runs).

Entries live in ``$POSTTRAIN_CACHE/prepared`` (else ``$XDG_CACHE_HOME/posttrain/prepared``, else
``~/.cache/posttrain/prepared``), or the directory a run's ``prepare_cache_dir`` names (``--dir``). Clearing is
always safe: a run that finds no entry prepares its data again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain cache",
        description="List, size or clear the prepared-data cache (docs: datasets, 'The prepared-data cache').",
    )
    p.add_argument("action", nargs="?", choices=("list", "size", "clear"), default="list")
    p.add_argument("keys", nargs="*", help="clear: only the entries whose key starts with one of these")
    p.add_argument("--dir", help="the cache directory (a run's prepare_cache_dir); default: the user cache")
    p.add_argument("--json", action="store_true", help="list/size: machine-readable output")
    args = p.parse_args(argv)
    from posttrain import _prepare_cache as cache

    root = Path(args.dir).expanduser() if args.dir else cache.default_root()
    found = cache.entries(root)
    if args.action == "clear":
        chosen = [e for e in found if not args.keys or any(e["key"].startswith(k) for k in args.keys)]
        for e in chosen:
            shutil.rmtree(e["path"], ignore_errors=True)
        print(
            f"removed {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} ({_size(sum(e['bytes'] for e in chosen))}) from {root}"
        )
        return 0
    total = sum(e["bytes"] for e in found)
    if args.json:
        print(json.dumps({"dir": str(root), "bytes": total, "entries": found if args.action == "list" else len(found)}))
        return 0
    if args.action == "size":
        print(f"{_size(total)} in {len(found)} entr{'y' if len(found) == 1 else 'ies'} ({root})")
        return 0
    print(f"prepared-data cache: {root}")
    if not found:
        print("  (empty)")
    for e in found:
        if not e["complete"]:
            print(f"  {e['key'][:24]:<24} {_size(e['bytes']):>9}  unfinished or unreadable (safe to clear)")
            continue
        print(
            f"  {e['key'][:12]:<12} {_size(e['bytes']):>9}  {e.get('method', '?'):<10} {e.get('rows', '?'):>8} rows  "
            f"{e.get('created', '')}  {e.get('data', '')}"
        )
    print(
        f"{_size(total)} in {len(found)} entr{'y' if len(found) == 1 else 'ies'}; `posttrain cache clear` removes them"
    )
    return 0
