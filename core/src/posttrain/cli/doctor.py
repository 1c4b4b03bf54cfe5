"""``posttrain doctor``: import every plugin in its own subprocess and report what is wrong."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from posttrain import _discovery as discovery

PROBE = r"""
import importlib, json, sys, time, traceback
module, attr = sys.argv[1], sys.argv[2]
heavy_before = {m for m in ("torch", "vllm") if m in sys.modules}
start = time.perf_counter()
try:
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    error = None
except BaseException:
    error = traceback.format_exc(limit=-3)
elapsed = time.perf_counter() - start
heavy = sorted({m for m in ("torch", "vllm") if m in sys.modules} - heavy_before)
print(json.dumps({"error": error, "seconds": elapsed, "heavy": heavy}))
"""


def probe(entry: discovery.Entry, timeout: float) -> dict:
    module, _, attr = entry.value.partition(":")
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, module, attr], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"import did not finish within {timeout:.0f} s", "seconds": timeout, "heavy": []}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {
            "error": f"the import crashed the interpreter (exit {out.returncode}): {out.stderr[-500:]}",
            "seconds": 0.0,
            "heavy": [],
        }


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain doctor", description="Import each plugin in a subprocess and report.")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per import (default 60)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from posttrain.cli import plugin_commands

    entries = discovery.discover(tuple(discovery.GROUPS))
    plugin_commands.mark_builtin_conflicts(entries)
    import os
    from concurrent.futures import ThreadPoolExecutor

    importable = [e for e in entries if e.status != discovery.BROKEN]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        probes = dict(zip((id(e) for e in importable), pool.map(lambda e: probe(e, args.timeout), importable)))
    report, problems = [], 0
    for e in entries:
        row = {
            "kind": e.kind,
            "name": e.name,
            "package": e.package,
            "version": e.version,
            "status": e.status,
            "problems": [],
            "notes": [],
        }
        if e.status in (discovery.BROKEN, discovery.CONFLICT, discovery.INCOMPATIBLE):
            row["problems"].append(f"{e.status}: {e.reason}")
        if e.declared_status == discovery.STABLE and e.status in (discovery.INCOMPATIBLE, discovery.BROKEN):
            row["problems"].append("claims stable but cannot be used with this core (stale status)")
        if e.status != discovery.BROKEN:
            result = probes[id(e)]
            row["import_seconds"] = round(result["seconds"], 3)
            if result["error"]:
                row["problems"].append("import failed:\n" + result["error"].rstrip())
            if result["heavy"]:
                row["notes"].append(f"imports {', '.join(result['heavy'])} at module level")
        problems += bool(row["problems"])
        report.append(row)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for row in report:
            mark = "FAIL" if row["problems"] else "ok  "
            timing = f"{row['import_seconds']:.2f}s" if "import_seconds" in row else "-"
            print(
                f"{mark} {row['kind']:6} {row['name']:16} {row['package']} {row['version']} [{row['status']}] "
                f"import {timing}" + (f" ({'; '.join(row['notes'])})" if row["notes"] else "")
            )
            for problem in row["problems"]:
                print("       " + problem.replace("\n", "\n       "))
        print(f"\n{len(report)} entries checked, {problems} with problems.")
    return 1 if problems else 0
