"""Calibrate the online-RL learning tests: how much does the echo task's exact-answer probability rise?

The learning tests (``plugins/posttrain-{grpo,rloo,online-dpo}/tests/test_train.py``) assert a margin on
``echo_exact_probability`` after a fixed number of steps. A margin must hold on every machine, and a
different CPU or thread count changes the floating-point trajectory about as much as a different seed does,
so this script runs the same configuration over several seeds (model init, data order and sampling) and
torch thread counts, each run in its own process, and prints the rise per run and the minimum. Set the
test's margin well below the minimum printed here, and record the figures in the test's comment.

    python benchmarks/calibrate_learning.py grpo rloo online-dpo --seeds 0-9 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

# The configuration the learning tests use (keep in sync with their test_train.py).
STEPS, LEARNING_RATE, BATCH, GENERATIONS = 40, 3e-3, 64, 8  # BATCH counts completions: 8 prompts x 8
# online-dpo samples two completions per prompt and its batch counts prompts: 32 prompts = 64 completions a step.
ONLINE_DPO = {"per_device_train_batch_size": 32, "beta": 0.1, "temperature": 1.0}


def one_run(method: str, seed: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from posttrain.loop import train
    from posttrain.testing import build_echo_model, echo_exact, echo_exact_probability, echo_rows

    fields = {"per_device_train_batch_size": BATCH, "num_generations": GENERATIONS}
    if method == "grpo":
        from posttrain_grpo import GRPO as Method
        from posttrain_grpo import GRPOConfig as Config
    elif method == "rloo":
        from posttrain_rloo import RLOO as Method
        from posttrain_rloo import RLOOConfig as Config
    else:
        from posttrain_online_dpo import OnlineDPO as Method
        from posttrain_online_dpo import OnlineDPOConfig as Config

        fields = ONLINE_DPO
    with tempfile.TemporaryDirectory() as tmp:
        model = build_echo_model(tmp, seed=seed)
        config = Config(
            model=str(model),
            output_dir=f"{tmp}/run",
            reward_funcs=["echo_exact"],
            max_steps=STEPS,
            learning_rate=LEARNING_RATE,
            max_completion_length=4,
            logging_steps=1,
            save_steps=0,
            disable_progress_bar=True,
            seed=seed,
            **fields,
        )
        train(Method(), config, train_dataset=echo_rows(), rewards={"echo_exact": echo_exact})
        before, after = echo_exact_probability(model), echo_exact_probability(f"{tmp}/run")
    return {
        "method": method,
        "seed": seed,
        "threads": threads,
        "before": before,
        "after": after,
        "rise": after - before,
    }


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="+", choices=["grpo", "rloo", "online-dpo"])
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SEED", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    for method in args.methods:
        rises = []
        for threads in args.threads:
            for seed in _seeds(args.seeds):
                out = subprocess.run(
                    [sys.executable, __file__, method, "--one", method, str(seed), str(threads)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rises.append(row["rise"])
                print(
                    f"{method} seed {seed} threads {threads}: {row['before']:.3f} -> {row['after']:.3f} "
                    f"(rise {row['rise']:+.3f})",
                    flush=True,
                )
        print(f"{method}: minimum rise {min(rises):+.3f}, mean {sum(rises) / len(rises):+.3f} over {len(rises)} runs")


if __name__ == "__main__":
    main()
