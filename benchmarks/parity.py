"""Run every plugin's parity script against TRL and write one summary table.

Run from the repository root in an environment with trl==1.16.0, posttrain and every plugin installed
(``nox -s parity`` builds one)::

    python benchmarks/parity.py                 # all plugins/*/parity/parity_*.py
    python benchmarks/parity.py dpo grpo        # only these plugins (posttrain-<name>)

Each script runs in its own process and writes ``parity/result.json`` next to itself; a result file older than the
run counts as missing, so a stale number is never reported. Writes ``benchmarks/results/parity.{json,md}`` and exits
1 when a comparison missed its target or a script wrote no result. With plugin names, the other plugins' rows of
the existing ``parity.json`` are kept, each with the date it was measured.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_script(script: Path) -> list[dict]:
    """Run one parity script; one row per comparison it reports (a result file may hold a list)."""
    plugin = script.parts[-3]
    started = time.time()
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - started
    fresh = [p for p in sorted(script.parent.glob("result*.json")) if p.stat().st_mtime >= started]
    if not fresh:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return [
            {
                "plugin": plugin,
                "script": str(script.relative_to(ROOT)),
                "exit_code": proc.returncode,
                "seconds": seconds,
                "passed": False,
                "error": "the script wrote no result file: " + " | ".join(tail),
            }
        ]
    rows = []
    for path in fresh:
        data = json.loads(path.read_text())
        for row in data if isinstance(data, list) else [data]:
            # per-step figures and details stay in the plugin's file; a posttrain.result/1 file names its
            # statistic "measured" and its target "tolerance"
            steps = (row.get("details") or {}).get("steps", "-") if isinstance(row.get("details"), dict) else "-"
            row = {k: v for k, v in row.items() if k not in ("details", "comparisons", "run")}
            if "measured" in row:
                row = {"steps": steps, **row, "max_rel_diff": row["measured"], "target": row["tolerance"]}
            rows.append(
                {
                    "plugin": plugin,
                    "script": str(script.relative_to(ROOT)),
                    "exit_code": proc.returncode,
                    "seconds": seconds,
                    **row,
                }
            )
    return rows


def markdown(rows: list[dict], versions: dict) -> str:
    lines = [
        "# Parity against TRL",
        "",
        f"Run {versions['date']} with TRL {versions['trl']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}; fp32 on CPU. Each plugin's `parity/parity_<method>.py` trains (or, for online "
        "methods, runs the deterministic parts of one step on fixed completions) with TRL and with posttrain on the "
        "same tiny model, data and hyperparameters, and reports the largest relative difference it found. "
        "Regenerate with `nox -s parity` (or `python benchmarks/parity.py` in an environment with TRL).",
        "",
        "| plugin | method | steps | max rel. diff | target | passed | what is compared | time | run |",
        "|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        diff = r.get("max_rel_diff")
        diff_text = f"{diff:.2e}" if isinstance(diff, (int, float)) and not math.isnan(diff) else "-"
        what = r.get("compared") or r.get("error") or "per-step training loss"
        target = r.get("target")
        lines.append(
            f"| {r['plugin']} | {r.get('method', '-')} | {r.get('steps', '-')} | {diff_text} | "
            f"{f'{target:.0e}' if isinstance(target, (int, float)) else '-'} | "
            f"{'yes' if r.get('passed') else '**no**'} | {what} | {r['seconds']:.0f} s | {r.get('date') or '-'} |"
        )
    passed = sum(bool(r.get("passed")) for r in rows)
    lines += ["", f"{passed} of {len(rows)} comparisons within target.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import torch
    import transformers
    import trl

    wanted = set(argv)
    scripts = [
        s
        for s in sorted(ROOT.glob("plugins/*/parity/parity_*.py"))
        if not wanted or s.parts[-3].removeprefix("posttrain-") in wanted
    ]
    today = datetime.date.today().isoformat()
    rows = []
    for script in scripts:
        print(f"parity: {script.relative_to(ROOT)}", flush=True)
        found = run_script(script)
        for r in found:
            status = "PASS" if r.get("passed") else "FAIL"
            name, diff = r.get("method", r["plugin"]), r.get("max_rel_diff")
            print(f"  {status} {name}: max rel diff {diff} ({r['seconds']:.0f} s)")
        rows += [{**r, "date": today} for r in found]
    previous = RESULTS / "parity.json"
    if wanted and previous.is_file():  # keep the rows of the plugins not run now, in plugin order
        old = json.loads(previous.read_text())
        rerun = {r["plugin"] for r in rows}
        kept = [{"date": old.get("versions", {}).get("date"), **r} for r in old["results"] if r["plugin"] not in rerun]
        rows = sorted(kept + rows, key=lambda r: r["plugin"])
    versions = {
        "date": today,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parity.json").write_text(json.dumps({"versions": versions, "results": rows}, indent=2) + "\n")
    text = markdown(rows, versions)
    (RESULTS / "parity.md").write_text(text)
    print(text)
    return 0 if rows and all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
