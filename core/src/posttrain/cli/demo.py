"""``posttrain demo``: a tiny model learns addition with SFT, then GRPO improves it, on a CPU in minutes.

Everything goes through the installed plugins and the shared loop, exactly as a user's run would:
``registry.resolve_method``, ``config.build_config``, ``loop.train`` on JSONL files written into the
output directory. The demo adds only the task (:mod:`posttrain.cli.demo_task`), a held-out evaluation
callback, a table, a summary and a plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from posttrain._errors import PluginError, PosttrainError
from posttrain.cli import demo_task

# What each stage needs, and where it comes from.
REQUIRED = (
    ("method", "sft", "posttrain-sft"),
    ("method", "grpo", "posttrain-grpo"),
    ("reward", "accuracy", "posttrain-rewards"),
)
# What the demo writes; --overwrite removes these entries only, never anything else in the directory.
OWN_ENTRIES = ("base-model", "data", "sft", "grpo", "summary.json", "demo.png")

MODEL = {"hidden_size": 64, "num_layers": 2}  # ~87k parameters, Llama-style, character tokenizer
# The two stages as a user would write them in YAML; run() adds the paths, seed and device.
SFT_CONFIG = {
    "learning_rate": 3e-3,  # a tiny random model needs a far larger rate than a pretrained one
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 32,
    "max_length": 32,
    "logging_steps": 10,
}
GRPO_CONFIG = {
    "reward_funcs": ["accuracy"],  # posttrain-rewards: the completion's final number equals the `answer` column
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 256,  # completions per step: 32 prompts x num_generations
    "num_generations": 8,
    "max_completion_length": demo_task.MAX_ANSWER_TOKENS,  # up to three digits and the end-of-turn token
    "temperature": 1.0,
    "per_prompt_generation": False,  # one generate call per batch: twice as fast on a CPU
    "logging_steps": 5,
}
# Stage lengths. SFT sees only a few demonstrations, so its held-out accuracy levels off (15-50% by
# seed) from about step 400; GRPO then learns from many more prompts, with a verifier only.
PLANS = {
    "full": {"sft_steps": 600, "grpo_steps": 600, "eval_every": {"sft": 100, "grpo": 50}},
    "quick": {"sft_steps": 400, "grpo_steps": 120, "eval_every": {"sft": 100, "grpo": 20}},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain demo",
        description="Build a tiny model, teach it two-digit addition with SFT, improve it with GRPO, and report "
        "held-out accuracy after each stage. Needs posttrain-sft, posttrain-grpo and posttrain-rewards.",
    )
    p.add_argument(
        "--output_dir",
        type=Path,
        default=Path("posttrain-demo"),
        help="where the runs, data, summary and plot go (default: posttrain-demo)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in a non-empty --output_dir")
    p.add_argument(
        "--quick", action="store_true", help="a shorter run: about half a minute on a CPU instead of one or two"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available, else CPU (default auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="model initialisation, data order and sampling (default 0)")
    return p


def require_plugins() -> dict[str, Any]:
    """The SFT and GRPO method classes (with their entry points) and the accuracy reward, or a one-line error."""
    from posttrain import _registry as registry

    found: dict[str, Any] = {}
    for kind, name, package in REQUIRED:
        try:
            if kind == "method":
                found[name] = registry.resolve_method(name)
            else:
                found[name] = registry.resolve_rewards([name])[name]
        except PluginError as exc:
            raise PosttrainError(
                f"the demo needs {package} (the {kind} {name!r}): install it with `posttrain install "
                f"{package.removeprefix('posttrain-')}`, then run `posttrain demo` again. ({exc})"
            ) from None
    return found


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite`` (checked before anything loads)."""
    if path.exists() and not path.is_dir():
        raise PosttrainError(f"--output_dir {str(path)!r} is a file; choose a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise PosttrainError(
            f"--output_dir {str(path)!r} is not empty; pass --overwrite to replace an earlier "
            "demo there, or choose another --output_dir."
        )


def clear_output_dir(path: Path) -> Path:
    """Remove what an earlier demo wrote (only that: a mistyped path never loses unrelated files)."""
    for name in OWN_ENTRIES:
        entry = path / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise PosttrainError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto.")
    device = "cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    return device


def run(command: str, argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    check_output_dir(args.output_dir, args.overwrite)
    plugins = require_plugins()
    device = pick_device(args.device)
    out = clear_output_dir(args.output_dir)
    plan = PLANS["quick" if args.quick else "full"]

    import datasets
    from transformers.utils import logging as hf_logging

    from posttrain.testing import build_tiny_model

    datasets.disable_progress_bars()  # the loop's bar is the one progress display
    hf_logging.disable_progress_bar()

    train_pairs, held_out = demo_task.problems()
    data = out / "data"
    sft_data = demo_task.write_jsonl(data / "sft.jsonl", demo_task.sft_rows(train_pairs[: demo_task.N_DEMONSTRATIONS]))
    grpo_data = demo_task.write_jsonl(data / "grpo.jsonl", demo_task.grpo_rows(train_pairs))
    demo_task.write_jsonl(data / "held_out.jsonl", demo_task.grpo_rows(held_out))
    base = build_tiny_model(out / "base-model", **MODEL, seed=args.seed)
    print(
        f"posttrain demo: a {MODEL['num_layers']}-layer, hidden-{MODEL['hidden_size']} Llama-style model learns "
        f"two-digit + one-digit addition on {device}: SFT on {demo_task.N_DEMONSTRATIONS} worked examples, then "
        f"GRPO on {len(train_pairs)} prompts with the `accuracy` verifier; scored on {len(held_out)} held-out "
        f"problems. Output in {out}"
    )

    demo = Stages(out, plan, held_out, device, common={"seed": args.seed, "use_cpu": device == "cpu"})
    demo.score("untrained", base, steps=0, seconds=0.0)
    demo.train("sft", plugins["sft"], {**SFT_CONFIG, "model": str(base), "dataset": str(sft_data)})
    grpo_values = {**GRPO_CONFIG, "model": str(out / "sft"), "dataset": str(grpo_data)}
    demo.train("grpo", plugins["grpo"], grpo_values, rewards={"accuracy": plugins["accuracy"]})
    stages, curve = demo.stages, demo.curve

    elapsed = time.perf_counter() - started
    print_table(stages)
    summary = {
        "task": "two-digit + one-digit addition as a chat; held-out exact match, greedy decoding",
        "seed": args.seed,
        "quick": args.quick,
        "device": device,
        "model": MODEL,
        "plan": plan,
        "held_out_problems": len(held_out),
        "accuracy": {s["stage"]: s["accuracy"] for s in stages},
        "digit_accuracy": {s["stage"]: s["digit_accuracy"] for s in stages},
        "stages": stages,
        "held_out_curve": curve,
        "runs": {"sft": "sft", "grpo": "grpo"},
        "wall_seconds": round(elapsed, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_demo(out, plan["sft_steps"], curve)
    print(f"done in {elapsed:.1f} s; summary in {out / 'summary.json'}")
    return 0


class Stages:
    """Runs the training stages one after another and keeps their held-out scores (a table row per stage,
    and a curve over the demo's step axis, on which GRPO's steps follow SFT's)."""

    def __init__(self, out: Path, plan: dict, held_out: list, device: str, common: dict):
        self.out, self.plan, self.held_out, self.device, self.common = out, plan, held_out, device, common
        self.stages: list[dict] = []
        self.curve: list[dict] = []
        self.offset = 0

    def score(self, name: str, model_dir: Path, steps: int, seconds: float) -> None:
        scores = score_saved(model_dir, self.held_out, self.device)
        self.curve.append({"stage": name, "step": steps, "demo_step": self.offset + steps, **scores})
        self.stages.append({"stage": name, "steps": steps, "seconds": round(seconds, 1), **scores})

    def train(self, name: str, plugin: tuple, values: dict, rewards: dict | None = None) -> None:
        """One stage through ``posttrain.loop.train`` as ``posttrain train`` runs it (config checks, plugin
        callbacks, provenance), then its saved model scored."""
        from posttrain import _discovery as discovery
        from posttrain import _environment as environment
        from posttrain import _registry as registry
        from posttrain.config import build_config
        from posttrain.loop import train

        method_class, entry = plugin
        steps = self.plan[f"{name}_steps"]
        values = {
            **self.common,
            **values,
            "output_dir": str(self.out / name),
            "overwrite_output_dir": True,
            "max_steps": steps,
            "save_steps": steps // 2,
            "save_total_limit": 1,
        }
        config = build_config(method_class.config_class, values, source=f"posttrain demo ({name})")
        evaluator = demo_task.HeldOutEval(
            self.held_out, self.plan["eval_every"][name], name, self.offset, steps, self.curve
        )
        reward_entries = [e for e in discovery.discover(("reward",)) if e.name in (rewards or {})]
        started = time.perf_counter()
        train(
            method_class(),
            config,
            rewards=rewards,
            callbacks=[*registry.callbacks_for(config), evaluator],
            provenance=environment.provenance(entry, reward_entries),
        )
        self.score(name, self.out / name, steps, time.perf_counter() - started)
        self.offset += steps


def score_saved(model_dir: Path, held_out: list, device: str) -> dict[str, float]:
    """Load a saved model as a user would and score it: the number reported is the artifact's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    return demo_task.score(model, AutoTokenizer.from_pretrained(model_dir), held_out)


def print_table(stages: list[dict]) -> None:
    labels = {"untrained": "untrained", "sft": "after SFT", "grpo": "after GRPO"}
    print(f"\n{'stage':<12}{'steps':>7}{'held-out accuracy':>20}{'digits right':>15}{'time':>9}")
    for s in stages:
        print(
            f"{labels[s['stage']]:<12}{s['steps']:>7}{s['accuracy']:>20.1%}{s['digit_accuracy']:>15.1%}"
            f"{s['seconds']:>8.1f}s"
        )
    print()


def plot_demo(out: Path, sft_steps: int, curve: list[dict]) -> None:
    """SFT loss, GRPO reward and held-out accuracy on one step axis (GRPO steps follow the SFT steps)."""
    from posttrain.cli.plot import plot, read_metrics

    rows = [{"step": r["step"], "loss (SFT)": r["loss"]} for r in read_metrics(out / "sft") if "loss" in r]
    rows += [
        {"step": sft_steps + r["step"], "reward (GRPO)": r["reward"]}
        for r in read_metrics(out / "grpo")
        if "reward" in r
    ]
    rows += [{"step": r["demo_step"], "held-out accuracy": r["accuracy"]} for r in curve]
    try:
        path = plot(
            sorted(rows, key=lambda r: r["step"]),
            out / "demo.png",
            ["loss (SFT)", "reward (GRPO)", "held-out accuracy"],
            title="posttrain demo: SFT, then GRPO",
        )
    except PosttrainError as exc:  # matplotlib is the optional `plot` extra
        print(f"skipping the plot: {exc}")
        return
    print(f"plot: {path}")
