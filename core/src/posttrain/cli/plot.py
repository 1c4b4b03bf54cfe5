"""``posttrain plot RUN_DIR``: render metrics.jsonl to a PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain._errors import PosttrainError

DEFAULT_METRICS = (
    "loss",
    "eval_loss",
    "reward",
    "rewards/margins",
    "rewards/accuracies",
    "accuracy",
    "mean_token_accuracy",
    "learning_rate",
    "grad_norm",
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PosttrainError(f"{run_dir} has no metrics.jsonl; point at a run's output_dir.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PosttrainError(f"{path}:{number} is not valid JSON ({exc.msg}).") from None
    if not rows:
        raise PosttrainError(f"{path} is empty; the run logged nothing yet.")
    return rows


def plot(rows: list[dict], out: Path, metrics: list[str] | None = None, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PosttrainError("plotting needs matplotlib: `pip install 'posttrain[plot]'`.") from None
    available = [m for m in (metrics or DEFAULT_METRICS) if any(m in r and r[m] is not None for r in rows)]
    if not available:
        raise PosttrainError(
            f"none of {metrics or list(DEFAULT_METRICS)} was logged; logged keys: "
            f"{sorted({k for r in rows for k in r})}"
        )
    fig, axes = plt.subplots(len(available), 1, figsize=(7, 2.2 * len(available)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], available):
        points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain plot", description="Plot a run's metrics.jsonl to a PNG.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, help="PNG path (default RUN_DIR/metrics.png)")
    p.add_argument("--metrics", help="comma-separated metric names (default: the usual ones that were logged)")
    args = p.parse_args(argv)
    out = plot(
        read_metrics(args.run_dir),
        args.output or args.run_dir / "metrics.png",
        args.metrics.split(",") if args.metrics else None,
        title=str(args.run_dir),
    )
    print(out)
    return 0
