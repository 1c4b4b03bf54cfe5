"""Asynchronous GRPO on the demo task: its reward curve with ``max_staleness: 1`` against synchronous GRPO.

For each seed the demo's model is built and its SFT stage trained once (``posttrain demo`` machinery:
``posttrain.cli.demo``); then its GRPO stage runs twice from that SFT model, identical but for
``async_generation: true, max_staleness: 1``. The per-step reward (``metrics.jsonl``), the held-out accuracy
during training (every 50 steps) and after it (the saved model), and the wall time are recorded::

    python benchmarks/async_demo.py                         # seeds 0,1,2, the demo's full plan (600 + 600 steps)
    python benchmarks/async_demo.py --seeds 0 --grpo-steps 100 --tag quick

Writes ``benchmarks/results/async-demo-<date>[-tag].{json,md}`` (and a ``.png`` when matplotlib is installed).
"Within noise" is judged against the seeds: the asynchronous run's difference from the synchronous one, seed by
seed, next to how far the synchronous runs of different seeds lie apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {"sync": {}, "async": {"async_generation": True, "max_staleness": 1}}
WINDOW = 100  # steps per row of the reward table


def run_seed(seed: int, root: Path, plan: dict) -> dict:
    """SFT once, then GRPO synchronously and asynchronously from the same SFT model."""
    from posttrain.cli import demo, demo_task
    from posttrain.testing import build_tiny_model

    plugins = demo.require_plugins()
    demo.pick_device("cpu")  # one torch thread; the asynchronous worker takes the same
    train_pairs, held_out = demo_task.problems()
    data = root / "data"
    sft_data = demo_task.write_jsonl(data / "sft.jsonl", demo_task.sft_rows(train_pairs[: demo_task.N_DEMONSTRATIONS]))
    grpo_data = demo_task.write_jsonl(data / "grpo.jsonl", demo_task.grpo_rows(train_pairs))
    base = build_tiny_model(root / "base-model", **demo.MODEL, seed=seed)
    common = {"seed": seed, "use_cpu": True}
    sft = demo.Stages(root, plan, held_out, "cpu", common)
    sft.train("sft", plugins["sft"], {**demo.SFT_CONFIG, "model": str(base), "dataset": str(sft_data)})
    out = {"sft_accuracy": sft.stages[-1]["accuracy"], "variants": {}}
    for variant, fields in VARIANTS.items():
        stages = demo.Stages(root / variant, plan, held_out, "cpu", common)
        values = {**demo.GRPO_CONFIG, **fields, "model": str(root / "sft"), "dataset": str(grpo_data)}
        started = time.perf_counter()
        stages.train("grpo", plugins["grpo"], values, rewards={"accuracy": plugins["accuracy"]})
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (root / variant / "grpo" / "metrics.jsonl").read_text().splitlines()]
        out["variants"][variant] = {
            "reward": [(r["step"], r["reward"]) for r in rows if "reward" in r],
            "staleness": [r["async/staleness"] for r in rows if "async/staleness" in r],
            "held_out": [(c["step"], c["accuracy"]) for c in stages.curve],
            "final_accuracy": stages.stages[-1]["accuracy"],
            "final_digit_accuracy": stages.stages[-1]["digit_accuracy"],
            "seconds": seconds,
        }
        print(
            f"seed {seed} {variant:5}: final held-out accuracy {stages.stages[-1]['accuracy']:.3f} in {seconds:.0f} s"
        )
    return out


def window_means(curve: list[tuple[int, float]], steps: int) -> list[float]:
    """Mean logged reward over each WINDOW-step slice of the run."""
    return [statistics.fmean(v for s, v in curve if lo < s <= lo + WINDOW) for lo in range(0, steps, WINDOW) if curve]


def summary(report: dict) -> dict:
    """Per seed: final accuracy and last-window reward of each variant and their difference; over seeds: the
    spread of the synchronous runs (the noise a difference is compared with)."""
    steps = report["plan"]["grpo_steps"]
    per_seed = {}
    for seed, result in report["seeds"].items():
        v = result["variants"]
        last = {name: window_means(v[name]["reward"], steps)[-1] for name in VARIANTS}
        per_seed[seed] = {
            "final_accuracy": {name: v[name]["final_accuracy"] for name in VARIANTS},
            "last_window_reward": last,
            "accuracy_difference": v["async"]["final_accuracy"] - v["sync"]["final_accuracy"],
            "reward_difference": last["async"] - last["sync"],
            "speed": v["sync"]["seconds"] / v["async"]["seconds"],
        }
    mean = {
        name: {
            "final_accuracy": statistics.fmean(p["final_accuracy"][name] for p in per_seed.values()),
            "last_window_reward": statistics.fmean(p["last_window_reward"][name] for p in per_seed.values()),
        }
        for name in VARIANTS
    }
    spread = {}
    if len(per_seed) > 1:
        spread = {
            "sync_final_accuracy_std": statistics.stdev(p["final_accuracy"]["sync"] for p in per_seed.values()),
            "sync_last_window_reward_std": statistics.stdev(p["last_window_reward"]["sync"] for p in per_seed.values()),
        }
    return {"per_seed": per_seed, "mean": mean, "seed_spread": spread}


def markdown(report: dict) -> str:
    s, plan = report["summary"], report["plan"]
    steps = plan["grpo_steps"]
    lines = [
        f"# Asynchronous vs synchronous GRPO on the demo task ({report['date'][:10]})",
        "",
        f"- The `posttrain demo` task (two-digit + one-digit addition, {plan['sft_steps']} SFT steps, then {steps} GRPO "
        "steps of 32 prompts x 8 samples with the `accuracy` verifier, held-out exact match on 200 problems), per seed "
        "one SFT model and two GRPO runs from it: synchronous, and `async_generation: true, max_staleness: 1`.",
        f"- CPU, one torch thread per process; {report['machine']['cpu_count']} cores shared with other work (load "
        f"average {report['machine']['load_avg_start'][0]:.1f} at the start, "
        f"{report['machine']['load_avg_end'][0]:.1f} at the end).",
        "",
        "## Final held-out accuracy and reward",
        "",
        "| seed | after SFT | GRPO sync | GRPO async (K=1) | async - sync | reward, last 100 steps: sync | async "
        "| async - sync | wall time sync / async |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, p in s["per_seed"].items():
        lines.append(
            f"| {seed} | {report['seeds'][seed]['sft_accuracy']:.3f} | {p['final_accuracy']['sync']:.3f} | "
            f"{p['final_accuracy']['async']:.3f} | {p['accuracy_difference']:+.3f} | "
            f"{p['last_window_reward']['sync']:.3f} | {p['last_window_reward']['async']:.3f} | "
            f"{p['reward_difference']:+.3f} | {p['speed']:.2f} |"
        )
    m = s["mean"]
    lines.append(
        f"| mean | | {m['sync']['final_accuracy']:.3f} | {m['async']['final_accuracy']:.3f} | "
        f"{m['async']['final_accuracy'] - m['sync']['final_accuracy']:+.3f} | {m['sync']['last_window_reward']:.3f} | "
        f"{m['async']['last_window_reward']:.3f} | "
        f"{m['async']['last_window_reward'] - m['sync']['last_window_reward']:+.3f} | |"
    )
    if s["seed_spread"]:
        lines += [
            "",
            f"Seed-to-seed spread of the synchronous runs (standard deviation over seeds): held-out accuracy "
            f"{s['seed_spread']['sync_final_accuracy_std']:.3f}, last-100-step reward "
            f"{s['seed_spread']['sync_last_window_reward_std']:.3f}.",
        ]
    lines += [
        "",
        f"## Reward curves (mean logged reward per {WINDOW} steps)",
        "",
        "| seed | variant | " + " | ".join(f"{lo + 1}-{lo + WINDOW}" for lo in range(0, steps, WINDOW)) + " |",
        "|---|---|" + "---:|" * len(range(0, steps, WINDOW)),
    ]
    for seed, result in report["seeds"].items():
        for name in VARIANTS:
            means = window_means(result["variants"][name]["reward"], steps)
            lines.append(f"| {seed} | {name} | " + " | ".join(f"{x:.3f}" for x in means) + " |")
    lines += [
        "",
        "## Held-out accuracy during GRPO",
        "",
        "| seed | variant | "
        + " | ".join(str(step) for step, _ in next(iter(report["seeds"].values()))["variants"]["sync"]["held_out"])
        + " | final |",
    ]
    first = next(iter(report["seeds"].values()))["variants"]["sync"]["held_out"]
    lines.append("|---|---|" + "---:|" * (len(first) + 1))
    for seed, result in report["seeds"].items():
        for name in VARIANTS:
            v = result["variants"][name]
            lines.append(
                f"| {seed} | {name} | "
                + " | ".join(f"{a:.3f}" for _, a in v["held_out"])
                + f" | {v['final_accuracy']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, (seed, result) in enumerate(report["seeds"].items()):
        for name, style in (("sync", "-"), ("async", "--")):
            curve = result["variants"][name]["reward"]
            smoothed = [statistics.fmean(v for _, v in curve[max(0, j - 4) : j + 1]) for j in range(len(curve))]
            ax.plot([s for s, _ in curve], smoothed, style, color=colors[i % len(colors)], label=f"seed {seed} {name}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (accuracy), 25-step moving mean")
    ax.set_title("GRPO on the demo task: synchronous (solid) vs async, max_staleness 1 (dashed)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from posttrain.cli import demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sft-steps", type=int, default=demo.PLANS["full"]["sft_steps"])
    p.add_argument("--grpo-steps", type=int, default=demo.PLANS["full"]["grpo_steps"])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("POSTTRAIN_EXPERIMENTAL_SILENCE", "1")
    plan = {"sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps, "eval_every": {"sft": 100, "grpo": 50}}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "plan": plan,
        "variants": VARIANTS,
        "seeds": {},
    }
    with tempfile.TemporaryDirectory(prefix="posttrain-async-demo-") as tmp:
        for seed in (int(x) for x in args.seeds.split(",")):
            report["seeds"][str(seed)] = run_seed(seed, Path(tmp) / f"seed-{seed}", plan)
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["summary"] = summary(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"async-demo-{report['date'][:10]}{f'-{args.tag}' if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    plot(report, out / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
