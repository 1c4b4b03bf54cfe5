"""Per-step parity of posttrain-kto against TRL 1.16's KTOTrainer.

Same tiny model (built locally), same rows and hyperparameters, fp32 on CPU, full batch (so TRL's rotation of
completions inside a `per_device_train_batch_size` chunk and posttrain's rotation inside the micro-batch build the
same mismatched pairs), 10 steps, for several configurations. Compares the exact per-step loss (target: relative
1e-4), and reports the KL point, rewards and log-probs each step and the final weights.

Run (needs the parity environment, where trl==1.16.0 is installed beside posttrain)::

    /work/parity-venv/bin/python plugins/posttrain-kto/parity/parity_kto.py

Writes ``result.json`` next to this file and exits 1 if the target is missed.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest, and both trainers run under the same setting

TARGET = 1e-4
STEPS = 10
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
COMMON = {
    "learning_rate": 5e-3,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 0,
    "max_length": 48,
    "beta": 0.1,
}
# name -> (KTO fields, row kind)
CASES = {
    "kto": ({"loss_type": "kto"}, "unpaired"),
    "kto_conversational": ({"loss_type": "kto"}, "conversational"),
    "kto_paired_rows": ({"loss_type": "kto"}, "paired"),
    "kto_weighted": ({"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.7}, "unpaired"),
    "kto_precomputed_ref": ({"loss_type": "kto", "precompute_ref_log_probs": True}, "unpaired"),
    "kto_truncated": ({"loss_type": "kto", "max_length": 14}, "unpaired"),
    "apo_zero_unpaired": ({"loss_type": "apo_zero_unpaired"}, "unpaired"),
}


def make_rows(kind: str, n: int = 12) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        prompt = f"Say {word}:"
        good, bad = f" {word} yes", f" {word[::-1]} no{'o' * rng.randint(0, 4)}"
        if kind == "paired":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif kind == "conversational":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": (good if i % 3 else bad).strip()}],
                    "label": bool(i % 3),
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": good if i % 3 else bad, "label": bool(i % 3)})
    return rows[: n // 2] if kind == "paired" else rows  # paired: 6 pairs -> 12 unpaired rows


def run_trl(model_dir: Path, rows: list[dict], fields: dict, out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    n_rows = len(rows) * (2 if "chosen" in rows[0] else 1)
    args = KTOConfig(
        output_dir=str(out),
        per_device_train_batch_size=n_rows,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        logging_steps=1,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
        **{**COMMON, **fields},
    )
    trainer = KTOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    losses: list[float] = []
    metrics: list[dict] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):  # the exact per-step loss and metrics (the logged loss is rounded)
        loss = compute_loss(model, inputs, *a, **k)
        losses.append(float(loss.detach()))
        metrics.append({m: trainer._metrics["train"][m][-1] for m in METRICS if trainer._metrics["train"][m]})
        return loss

    trainer.compute_loss = recording
    trainer.train()
    return losses, metrics, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def run_posttrain(model_dir: Path, rows: list[dict], fields: dict, out: Path):
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_kto import KTO, KTOConfig
    from safetensors.torch import load_file

    n_rows = len(rows) * (2 if "chosen" in rows[0] else 1)
    values = {
        "model": str(model_dir),
        "output_dir": str(out),
        "per_device_train_batch_size": n_rows,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 0,
        "use_cpu": True,
        "disable_progress_bar": True,
        **COMMON,
        **fields,
    }
    history = train(KTO(), build_config(KTOConfig, values), train_dataset=rows).log_history
    losses = [row["loss"] for row in history if "loss" in row]
    metrics = [{m: row[m] for m in METRICS if m in row} for row in history if "loss" in row]
    return losses, metrics, load_file(out / "model.safetensors")


def main() -> int:
    import transformers
    import trl
    from posttrain.testing import build_tiny_model

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="parity-kto-"))
    model_dir = build_tiny_model(work / "model", hidden_size=32, num_layers=2)
    details, worst_overall = {}, 0.0
    for name, (fields, kind) in CASES.items():
        rows = make_rows(kind)
        trl_losses, trl_metrics, trl_weights = run_trl(model_dir, rows, fields, work / f"trl-{name}")
        pt_losses, pt_metrics, pt_weights = run_posttrain(model_dir, rows, fields, work / f"pt-{name}")
        assert len(trl_losses) == len(pt_losses) == STEPS, (name, len(trl_losses), len(pt_losses))
        rel = [abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(trl_losses, pt_losses)]
        # metrics can be ~0 (rewards at step 1), so they are compared in absolute terms
        # TRL also logs kl = 0 for apo_zero_unpaired, which has no reference point; posttrain does not log it
        metric_diff = max(abs(t[m] - p[m]) for t, p in zip(trl_metrics, pt_metrics) for m in t if m in p)
        assert all(set(p) <= set(t) for t, p in zip(trl_metrics, pt_metrics)), (trl_metrics[0], pt_metrics[0])
        weight_diff = max((trl_weights[k] - pt_weights[k]).abs().max().item() for k in pt_weights)
        worst_overall = max(worst_overall, max(rel))
        details[name] = {
            "rows": kind,
            "fields": fields,
            "trl": trl_losses,
            "posttrain": pt_losses,
            "max_rel_diff": max(rel),
            "metrics_max_abs_diff": metric_diff,
            "final_weight_max_abs_diff": weight_diff,
            "kl_per_step": {"trl": [m.get("kl") for m in trl_metrics], "posttrain": [m.get("kl") for m in pt_metrics]},
        }
        print(f"\n== {name} ({kind} rows, {fields})")
        print(f"{'step':>4} {'trl loss':>12} {'posttrain':>12} {'rel diff':>9} {'trl kl':>10} {'pt kl':>10}")
        for step, (a, b, r, tm, pm) in enumerate(zip(trl_losses, pt_losses, rel, trl_metrics, pt_metrics), start=1):
            print(f"{step:>4} {a:>12.8f} {b:>12.8f} {r:>9.2e} {tm.get('kl', 0):>10.6f} {pm.get('kl', 0):>10.6f}")
        print(
            f"max rel diff {max(rel):.2e}; metrics max abs diff {metric_diff:.2e}; "
            f"final weights max abs diff {weight_diff:.2e}"
        )
    passed = worst_overall <= TARGET
    result = {
        "method": "kto",
        "trl_version": trl.__version__,
        "steps": STEPS,
        "max_rel_diff": worst_overall,
        "target": TARGET,
        "passed": passed,
        "details": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": "cpu",
            "dtype": "float32",
            "rows": 12,
            "batch": "full (12 unpaired rows, accumulation 1)",
            "compared": "per-step loss (target); KL point, rewards and log-probs (absolute)",
            **COMMON,
            "cases": details,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} KTOTrainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={name: (c["trl"], c["posttrain"]) for name, c in result["details"]["cases"].items()},
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(
        f"\nmax relative difference over {len(CASES)} cases x {STEPS} steps: {worst_overall:.2e} "
        f"(target {TARGET:.0e}) -> {'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
