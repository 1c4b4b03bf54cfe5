"""Calibrate ``tests/test_learning.py``: how much does GRPO against the calculator raise the perfect-episode
probability, over seeds and torch thread counts?

A margin must hold on every machine, and a different thread count changes the floating-point trajectory about
as much as a different seed does, so this runs the test's own ``learning_run`` (loaded from the test file, so
the two never drift apart) once per seed and thread count, each in its own process, and prints the rise of each
run and the minimum. Set the test's ``MARGIN`` well below that minimum and record the range in its comment.

    python plugins/posttrain-envs/examples/calibrate_tool_learning.py --seeds 0-5 --threads 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

TEST_FILE = Path(__file__).parents[1] / "tests" / "test_learning.py"


def load_test_module():
    spec = importlib.util.spec_from_file_location("posttrain_envs_test_learning", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-5")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--output", type=Path, help="also write the runs as JSON here")
    parser.add_argument("--one", nargs=2, type=int, metavar=("SEED", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(load_test_module().learning_run(*args.one)))
        return
    env = {**os.environ, "POSTTRAIN_EXPERIMENTAL_SILENCE": "1"}
    runs = []
    for threads in args.threads:
        for seed in seeds(args.seeds):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(seed), str(threads)],
                capture_output=True,
                text=True,
                env={**env, "OMP_NUM_THREADS": str(threads)},
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(
                f"seed {seed} threads {threads}: {r['before']:.4f} -> {r['after']:.4f} (rise {r['rise']:+.4f})",
                flush=True,
            )
    rises = [r["rise"] for r in runs]
    print(f"rise over {len(runs)} runs: min {min(rises):+.4f}, max {max(rises):+.4f}")
    if args.output:
        args.output.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
