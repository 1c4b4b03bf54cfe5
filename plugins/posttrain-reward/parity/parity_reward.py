"""Per-step loss parity of posttrain-reward against TRL 1.16's RewardTrainer.

Same tiny reward model (a causal LM built locally, loaded once as a one-output sequence classifier and saved, so both
start from the same score head), same rows and hyperparameters, fp32 on CPU, full batch, 10 steps, for standard and
conversational rows, implicit and explicit prompts, the margin column, the centering term and max_length filtering.
Passes when every step's loss agrees within a relative 1e-4.

Run (needs the parity environment, where trl==1.16.0 is installed beside posttrain)::

    /work/parity-venv/bin/python plugins/posttrain-reward/parity/parity_reward.py

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
os.environ.setdefault("CI", "1")  # TRL skips its usage ping under CI

import torch

TARGET = 1e-4
STEPS = 10
N_ROWS = 12
COMMON = {
    "learning_rate": 5e-3,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 0,
    "max_length": 1024,
}
# name -> (extra config fields, row kind, with a margin column)
CASES = {
    "standard_implicit": ({}, "implicit", False),
    "standard_explicit_margin_center": ({"center_rewards_coefficient": 0.01}, "explicit", True),
    "conversational_implicit": ({}, "chat_implicit", False),
    "conversational_explicit_margin": ({"center_rewards_coefficient": 0.01}, "chat_explicit", True),
    "max_length_filter": ({"max_length": 22}, "explicit", False),  # drops the longer pairs on both sides
}


def make_rows(kind: str, margin: bool) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(N_ROWS):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        prompt, chosen, rejected = f"Say {word}:", f" {word} yes", f" {word[::-1]} no{'o' * rng.randint(0, 4)}"
        if kind == "implicit":
            row = {"chosen": prompt + chosen, "rejected": prompt + rejected}
        elif kind == "explicit":
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            user = [{"role": "user", "content": prompt}]
            answers = [[{"role": "assistant", "content": text.strip()}] for text in (chosen, rejected)]
            if kind == "chat_implicit":
                row = {"chosen": user + answers[0], "rejected": user + answers[1]}
            else:
                row = {"prompt": user, "chosen": answers[0], "rejected": answers[1]}
        if margin:
            row["margin"] = round(rng.uniform(0.0, 1.5), 3)
        rows.append(row)
    return rows


def build_reward_model(work: Path) -> Path:
    """A tiny causal LM, loaded as a one-output classifier (new score head) and saved: the shared starting point."""
    from posttrain.testing import build_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    causal = build_tiny_model(work / "causal", hidden_size=32, num_layers=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1, dtype=torch.float32)
    model.save_pretrained(work / "rm-init")
    AutoTokenizer.from_pretrained(causal).save_pretrained(work / "rm-init")
    return work / "rm-init"


def run_trl(model_dir: Path, rows: list[dict], fields: dict, out: Path) -> tuple[list[float], list[float], dict, int]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=str(out),
        per_device_train_batch_size=N_ROWS,
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
    trainer = RewardTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    losses: list[float] = []
    margins: list[float] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):  # the exact per-step loss (the logged one is rounded)
        loss = compute_loss(model, inputs, *a, **k)
        losses.append(float(loss.detach()))
        margins.append(trainer._metrics["train"]["margin"][-1])
        return loss

    trainer.compute_loss = recording
    for callback in (PrinterCallback, ProgressCallback):  # our own table is the output
        trainer.remove_callback(callback)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return losses, margins, weights, len(trainer.train_dataset)


def run_posttrain(
    model_dir: Path, rows: list[dict], fields: dict, out: Path
) -> tuple[list[float], list[float], dict, int]:
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_reward import Reward, RewardConfig
    from safetensors.torch import load_file

    n_kept = len(Reward().prepare(rows, _context(model_dir, fields)))
    values = {
        "model": str(model_dir),
        "output_dir": str(out),
        "per_device_train_batch_size": n_kept,  # full batch of the pairs that survive max_length
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 0,
        "use_cpu": True,
        "disable_progress_bar": True,
        **COMMON,
        **fields,
    }
    result = train(Reward(), build_config(RewardConfig, values), train_dataset=rows)
    logged = [row for row in result.log_history if "loss" in row]
    return [r["loss"] for r in logged], [r["margin"] for r in logged], load_file(out / "model.safetensors"), n_kept


def _context(model_dir: Path, fields: dict):
    from posttrain import TrainContext
    from posttrain.config import build_config
    from posttrain.models import load_tokenizer
    from posttrain_reward import RewardConfig

    config = build_config(RewardConfig, {**COMMON, **fields})
    return TrainContext(config=config, tokenizer=load_tokenizer(str(model_dir)))


def main() -> int:
    import transformers
    import trl

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="parity-reward-"))
    model_dir = build_reward_model(work)
    details, worst_overall = {}, 0.0
    for name, (fields, kind, margin) in CASES.items():
        rows = make_rows(kind, margin)
        trl_losses, trl_margins, trl_weights, trl_kept = run_trl(model_dir, rows, fields, work / f"trl-{name}")
        pt_losses, pt_margins, pt_weights, pt_kept = run_posttrain(model_dir, rows, fields, work / f"pt-{name}")
        assert len(trl_losses) == len(pt_losses) == STEPS, (name, len(trl_losses), len(pt_losses))
        assert trl_kept == pt_kept, f"{name}: TRL kept {trl_kept} pairs, posttrain {pt_kept}"
        rel = [abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(trl_losses, pt_losses)]
        margin_diff = max(abs(a - b) for a, b in zip(trl_margins, pt_margins))
        weight_diff = max((trl_weights[k] - pt_weights[k]).abs().max().item() for k in pt_weights)
        worst_overall = max(worst_overall, max(rel))
        details[name] = {
            "fields": fields,
            "rows": kind + (" + margin" if margin else ""),
            "pairs_kept": f"{pt_kept} of {N_ROWS}",
            "trl": trl_losses,
            "posttrain": pt_losses,
            "max_rel_diff": max(rel),
            "metric_margin_max_abs_diff": margin_diff,
            "final_weight_max_abs_diff": weight_diff,
        }
        print(f"\n== {name} ({details[name]['rows']} rows, {fields}, {pt_kept} of {N_ROWS} pairs kept)")
        print(f"{'step':>4} {'trl':>14} {'posttrain':>14} {'rel diff':>10}")
        for step, (a, b, r) in enumerate(zip(trl_losses, pt_losses, rel), start=1):
            print(f"{step:>4} {a:>14.8f} {b:>14.8f} {r:>10.2e}")
        print(
            f"max rel diff {max(rel):.2e}; margin metric max abs diff {margin_diff:.2e}; "
            f"final weights max abs diff {weight_diff:.2e}"
        )
    passed = worst_overall <= TARGET
    result = {
        "method": "reward",
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
            "rows": N_ROWS,
            "batch": "full (every kept pair, accumulation 1)",
            **COMMON,
            "cases": details,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} RewardTrainer",
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
