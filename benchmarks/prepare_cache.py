"""Time to the first optimizer step with the prepared-data cache off, cold (a miss that writes the entry) and warm (a
hit), for SFT and DPO on large local datasets of the realistic workload (``bench.py``'s real32k: a 32,000-word
vocabulary, heavy-tailed row lengths).

    python benchmarks/prepare_cache.py --sft-rows 100000 --dpo-rows 50000 --rounds 3 \\
        --out benchmarks/results/prepare-cache-2026-11-30

Each run is a fresh process (``posttrain.loop.train`` with ``max_steps`` 1, one thread); the parent notes the time
before it starts the process, the run notes wall and process CPU time when set-up ends (``on_train_begin``: model,
tokenizer, data) and when the first step is logged, then exits. The three conditions run interleaved, round after
round, so machine load hits them alike; the report gives the median and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(spec: dict) -> None:
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    from posttrain.loop import train

    marks: dict = {}

    class Clock:
        def on_train_begin(self, ctx) -> None:
            marks["setup_wall"], marks["setup_cpu"] = time.time() - spec["t0"], cpu()

        def on_log(self, ctx, metrics) -> None:
            marks["first_step_wall"], marks["first_step_cpu"] = time.time() - spec["t0"], cpu()
            Path(spec["result"]).write_text(json.dumps(marks))
            sys.stdout.flush()
            os._exit(0)  # the first step is all this measures: no final save

    if spec["method"] == "sft":
        from posttrain_sft import SFT as Method
        from posttrain_sft import SFTConfig as Config
    else:
        from posttrain_dpo import DPO as Method
        from posttrain_dpo import DPOConfig as Config
    config = Config(
        model=spec["model"],
        dataset=spec["data"],
        output_dir=spec["output_dir"],
        max_steps=1,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=0,
        max_length=2048,
        disable_progress_bar=True,
        prepare_cache=spec["condition"] != "off",
        prepare_cache_dir=spec["cache_dir"],
    )
    train(Method(), config, callbacks=[Clock()])


def run_one(method: str, condition: str, paths: dict, tmp: Path, n: int) -> dict:
    result = tmp / f"result-{method}-{condition}-{n}.json"
    cache_dir = tmp / f"cache-{method}"
    if condition == "cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    spec = {
        "method": method,
        "condition": condition,
        "model": paths["model"],
        "data": paths[method],
        "output_dir": str(tmp / f"out-{method}-{condition}-{n}"),
        "cache_dir": str(cache_dir),
        "result": str(result),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    spec["t0"] = time.time()
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"{method} {condition} failed:\n{done.stderr[-3000:]}")
    marks = json.loads(result.read_text())
    said = [line for line in done.stdout.splitlines() if line.startswith("prepared data")]
    marks.update(method=method, condition=condition, round=n, said=said, load_avg=os.getloadavg()[0])
    marks["cache_bytes"] = (
        sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) if condition != "off" else 0
    )
    print(json.dumps(marks), flush=True)
    return marks


def summarise(runs: list[dict]) -> dict:
    cells: dict = {}
    for r in runs:
        cells.setdefault(r["method"], {}).setdefault(r["condition"], []).append(r)
    out = {}
    for method, by_condition in cells.items():
        out[method] = {}
        for condition, rs in by_condition.items():
            out[method][condition] = {
                key: {
                    "median": statistics.median(r[key] for r in rs),
                    "min": min(r[key] for r in rs),
                    "max": max(r[key] for r in rs),
                }
                for key in ("setup_wall", "setup_cpu", "first_step_wall", "first_step_cpu")
            }
            out[method][condition]["cache_bytes"] = max(r["cache_bytes"] for r in rs)
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Prepared-data cache: time to first step ({report['date']})",
        "",
        f"Machine: {report['machine']}. {report['rounds']} interleaved rounds; one process per run, 1 thread; "
        "median (min-max). Wall and CPU time from process start to the first logged step; set-up ends at "
        "`on_train_begin` (model, tokenizer, data read/checked/prepared or read from the cache).",
        "",
        f"Data: real32k workload of `bench.py` (32,000-word vocabulary, heavy-tailed lengths): SFT {report['rows']['sft']:,} "
        f"rows ({report['bytes']['sft'] / 1e6:.0f} MB JSONL), DPO {report['rows']['dpo']:,} pairs "
        f"({report['bytes']['dpo'] / 1e6:.0f} MB JSONL). Model: real32k (2 layers, hidden 256).",
        "",
        "| method | cache | first step wall | first step CPU | set-up wall | entry size |",
        "|---|---|---|---|---|---|",
    ]

    def cell(s: dict) -> str:
        return f"{s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f})"

    for method, by_condition in report["summary"].items():
        for condition in ("off", "cold", "warm"):
            s = by_condition.get(condition)
            if s is None:
                continue
            size = f"{s['cache_bytes'] / 1e6:.0f} MB" if s["cache_bytes"] else "-"
            lines.append(
                f"| {method} | {condition} | {cell(s['first_step_wall'])} | {cell(s['first_step_cpu'])} | "
                f"{cell(s['setup_wall'])} | {size} |"
            )
    lines += ["", "Ratios of medians (warm / off, cold / off):", ""]
    for method, c in report["summary"].items():
        if {"off", "cold", "warm"} <= set(c):
            w = c["warm"]["first_step_wall"]["median"] / c["off"]["first_step_wall"]["median"]
            k = c["cold"]["first_step_wall"]["median"] / c["off"]["first_step_wall"]["median"]
            wc = c["warm"]["first_step_cpu"]["median"] / c["off"]["first_step_cpu"]["median"]
            lines.append(f"- {method}: warm {w:.2f}x wall, {wc:.2f}x CPU; cold {k:.2f}x wall")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sft-rows", type=int, default=100_000)
    p.add_argument("--dpo-rows", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="sft,dpo")
    p.add_argument("--tmp", default=None, help="working directory (model, data, caches); default: a temporary one")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    sys.path.insert(0, str(HERE))
    import platform
    import tempfile

    import bench

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="posttrain-prepare-cache-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = tmp / "real32k"
    paths = {"model": str(model) if model.exists() else bench.build_model("real32k", tmp)}
    rows = {"sft": args.sft_rows, "dpo": args.dpo_rows}
    for method in ("sft", "dpo"):
        w = dict(bench.WORKLOADS["real32k"][method])
        path = tmp / f"{method}-{rows[method]}.jsonl"
        if not path.exists():
            per_step = w["batch"] * w["accum"]
            bench.write_realistic_data(method, w, rows[method] // per_step, path, 32000 - 6)
        paths[method] = str(path)
    runs = []
    methods = args.methods.split(",")
    for n in range(args.rounds):
        for method in methods if n % 2 == 0 else methods[::-1]:
            # off and cold alternate which goes first; warm needs the entry cold wrote
            order = ("off", "cold", "warm") if n % 2 == 0 else ("cold", "warm", "off")
            runs += [run_one(method, condition, paths, tmp, n) for condition in order]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "rounds": args.rounds,
        "rows": rows,
        "bytes": {m: Path(paths[m]).stat().st_size for m in ("sft", "dpo")},
        "runs": runs,
        "summary": summarise(runs),
    }
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        Path(args.out + ".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
