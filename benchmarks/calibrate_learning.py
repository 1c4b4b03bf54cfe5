"""Calibrate the learning tests: what each one measures, over several seeds and torch thread counts.

A learning test asserts that a metric improves by some margin after a fixed run. The margin must hold on every
machine, and another CPU or thread count changes the floating-point trajectory about as much as another seed does.
So this script runs each test's own measurement (a ``measure_*`` function in the test module, which the test calls
with seed 0) over several seeds (model initialisation, data order, sampling) and thread counts, each thread count in
its own process, and prints every run and, per measure, the minimum, mean and maximum. Set the test's threshold well
inside the worst value printed here, and record the command, the date and the figures in the test's docstring.

    python benchmarks/calibrate_learning.py --list
    python benchmarks/calibrate_learning.py grpo rloo online-dpo --seeds 0-9 --threads 1 2
    python benchmarks/calibrate_learning.py demo                           # the demo's accuracy gains

Cases: one per learning test (``sft-memorise``, ``dpo-sigmoid``, ...); ``grpo``, ``rloo`` and ``online-dpo``, the
online-RL learning tests' runs (the rise of ``echo_exact_probability``, keep in sync with their test_train.py); and
``demo`` for ``posttrain demo --quick`` (held-out accuracy gains of its two stages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plugin_tests
from _plugin_tests import load


def _tiny(work: Path, seed: int, **kwargs) -> Path:
    from posttrain.testing import build_tiny_model

    return build_tiny_model(work / "model", seed=seed, **kwargs)


# The configuration the online-RL learning tests use (keep in sync with their test_train.py).
STEPS, LEARNING_RATE, BATCH, GENERATIONS = 40, 3e-3, 64, 8  # BATCH counts completions: 8 prompts x 8
# online-dpo samples two completions per prompt and its batch counts prompts: 32 prompts = 64 completions a step.
ONLINE_DPO = {"per_device_train_batch_size": 32, "beta": 0.1, "temperature": 1.0}


def _online(method: str):
    """The run of ``method``'s learning test: the rise of P(exact answer) on the echo task."""

    def run(work: Path, seed: int) -> dict:
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
        model = build_echo_model(work, seed=seed)
        config = Config(
            model=str(model),
            output_dir=str(work / "run"),
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
        before, after = echo_exact_probability(model), echo_exact_probability(work / "run")
        return {"before": before, "after": after, "rise": after - before}

    return run


def _demo(work: Path, seed: int) -> dict:
    """``posttrain demo --quick`` in a subprocess with the calling process's thread count (OMP_NUM_THREADS)."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "posttrain", "demo", "--quick", "--seed", str(seed), "--output_dir", str(work / "d")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    summary = json.loads((work / "d" / "summary.json").read_text())
    accuracy, digits = summary["accuracy"], summary["digit_accuracy"]
    return {
        "untrained": accuracy["untrained"],
        "sft": accuracy["sft"],
        "grpo": accuracy["grpo"],
        "sft_gain": accuracy["sft"] - accuracy["untrained"],
        "grpo_gain": accuracy["grpo"] - accuracy["sft"],
        "grpo_digit_gain": digits["grpo"] - digits["sft"],
    }


CASES = {
    "sft-memorise": lambda w, s: load("sft", "test_train").measure_memorisation(_tiny(w, s), w, seed=s),
    "sft-lora": lambda w, s: load("sft", "test_train").measure_lora(_tiny(w, s), w, seed=s),
    "dpo-sigmoid": lambda w, s: load("dpo", "test_train").measure_sigmoid(
        _tiny(w, s), w, load("dpo", "conftest")._keyword_pairs, seed=s
    ),
    "dpo-ipo": lambda w, s: load("dpo", "test_train").measure_ipo(
        _tiny(w, s), w, load("dpo", "conftest")._keyword_pairs, seed=s
    ),
    "reward": lambda w, s: load("reward", "test_train").measure_learning(
        _tiny(w, s), w / "rm", load("reward", "conftest").keyword_pairs, seed=s
    ),
    "orpo": lambda w, s: load("orpo", "test_train").measure_learning(
        _tiny(w, s), w, load("orpo", "conftest").orpo_case_rows, seed=s
    ),
    "cpo": lambda w, s: load("cpo", "test_train").measure_learning(
        _tiny(w, s), w, load("cpo", "conftest").cpo_case_rows, seed=s
    ),
    "bco": lambda w, s: load("bco", "test_train").measure_learning(_tiny(w, s), w, seed=s),
    "tpo-sigmoid": lambda w, s: load("tpo", "test_train").measure_learning(_tiny(w, s), w, "sigmoid", 1.0, seed=s),
    "tpo-l": lambda w, s: load("tpo", "test_train").measure_learning(_tiny(w, s), w, "tpo-l", 0.0, seed=s),
    "kto": lambda w, s: load("kto", "test_train").measure_learning(
        _tiny(w, s), w, load("kto", "conftest").make_kto_rows(), seed=s
    ),
    "distill-forward": lambda w, s: load("distill", "test_train").measure_on_policy(
        _tiny(w, s), load("distill", "conftest").build_pattern_teacher(w / "teacher"), w, 0.0, 30, seed=s
    ),
    "distill-reverse": lambda w, s: load("distill", "test_train").measure_on_policy(
        _tiny(w, s), load("distill", "conftest").build_pattern_teacher(w / "teacher"), w, 1.0, 40, seed=s
    ),
    "distill-off-policy": lambda w, s: load("distill", "test_train").measure_off_policy(
        _tiny(w, s), _tiny(w / "teacher", 1, hidden_size=48), w, seed=s
    ),
    "grpo": _online("grpo"),
    "rloo": _online("rloo"),
    "online-dpo": _online("online-dpo"),
    "demo": _demo,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="default: all (see --list)")
    parser.add_argument("--seeds", default="0-4", help="a range 0-4 or a list 0,3,7 (default 0-4)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "SEEDS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    if args.one:
        import torch

        case, threads = args.one[0], int(args.one[2])
        torch.set_num_threads(threads)
        warnings.simplefilter("ignore")
        for seed in _plugin_tests.seeds(args.one[1]):
            with tempfile.TemporaryDirectory() as work:
                print(json.dumps({"seed": seed, "threads": threads, **CASES[case](Path(work), seed)}), flush=True)
        return
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; see --list")
    for case in args.cases or CASES:
        runs = []
        for threads in args.threads:
            out = subprocess.run(
                [sys.executable, __file__, "--one", case, args.seeds, str(threads)],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(f"{case} threads {threads}: failed\n{out.stderr[-3000:]}", flush=True)
                continue
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    runs.append(json.loads(line))
                    print(f"{case} {line}", flush=True)
        for name in [k for k in runs[0] if k not in ("seed", "threads")] if runs else []:
            values = [r[name] for r in runs]
            print(
                f"{case} {name}: min {min(values):+.4f}, mean {sum(values) / len(values):+.4f}, "
                f"max {max(values):+.4f} over {len(values)} runs",
                flush=True,
            )


if __name__ == "__main__":
    main()
