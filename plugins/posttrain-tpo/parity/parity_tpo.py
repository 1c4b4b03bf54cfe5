"""Parity of posttrain-tpo with TRL 1.16's ``trl.experimental.tpo.TPOTrainer`` (opt-in; not part of the tests).

Both sides train the same tiny Llama on the same 16 triples for 10 full-batch steps in fp32 on CPU (AdamW,
linear schedule, gradient clipping at 1.0), once per loss variant: sigmoid, hinge and ipo with the reference NLL
(tpo_alpha 1), and tpo-l with label smoothing and the NLL off (tpo_alpha 0, TRL then drops the reference rows).
TRL's per-step loss is recorded inside ``compute_loss``; posttrain's is the logged loss of each step.

The gold references all have 4 characters (5 tokens with EOS): TRL averages the NLL over every reference token of
the micro-batch, posttrain per triple (see loss.py, deviation 2), and the two agree exactly when the reference
lengths are equal. The script prints a table per variant, writes ``result.json`` next to itself and exits 1 if the
largest relative loss difference exceeds 1e-4. A last, informational run (not counted) repeats the sigmoid variant
with references of 1 to 8 characters to show the size of that documented NLL-normalisation difference.

Run:  /work/parity-venv/bin/python plugins/posttrain-tpo/parity/parity_tpo.py
"""

from __future__ import annotations

import copy
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("CI", "1")  # TRL skips its usage ping under CI

import torch

STEPS, LR, SEED, TARGET = 10, 5e-4, 0, 1e-4
VARIANTS = [
    {"loss_type": "sigmoid", "beta": 0.1, "tpo_alpha": 1.0, "label_smoothing": 0.0, "tpo_l_gamma": 0.5},
    {"loss_type": "hinge", "beta": 0.1, "tpo_alpha": 1.0, "label_smoothing": 0.0, "tpo_l_gamma": 0.5},
    {"loss_type": "ipo", "beta": 0.1, "tpo_alpha": 1.0, "label_smoothing": 0.0, "tpo_l_gamma": 0.5},
    {"loss_type": "tpo-l", "beta": 2.0, "tpo_alpha": 0.0, "label_smoothing": 0.1, "tpo_l_gamma": 0.5},
]


def triples(equal_references: bool = True) -> list[dict]:
    """16 standard-text triples; chosen/rejected of varying lengths, references of 4 characters (or 1 to 8)."""
    rng = random.Random(SEED)
    vowels, consonants = "aeiou", "bcdfghjklmnpqrstvwxz"
    return [
        {
            "prompt": "Word: " + "".join(rng.choices(vowels + consonants, k=rng.randint(2, 5))) + "\nReply: ",
            "chosen": "".join(rng.choices(vowels, k=rng.randint(2, 6))),
            "rejected": "".join(rng.choices(consonants, k=rng.randint(2, 6))),
            "reference": "".join(rng.choices(vowels, k=4 if equal_references else rng.randint(1, 8))),
        }
        for _ in range(16)
    ]


def run_trl(model_dir: Path, out_dir: Path, rows: list[dict], variant: dict) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    records: list[float] = []

    class RecordingTPOTrainer(TPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            records.append(loss.item())
            return loss

    args = TPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(rows),
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=SEED,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_length=1024,
        **variant,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = RecordingTPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return [{"loss": loss, "grad_norm": float(g)} for loss, g in zip(records, norms)]


def run_posttrain(model_dir: Path, out_dir: Path, rows: list[dict], variant: dict) -> list[dict]:
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_tpo import TPO, TPOConfig

    config = build_config(
        TPOConfig,
        {
            "model": str(model_dir),
            "output_dir": str(out_dir),
            "max_length": 1024,
            "per_device_train_batch_size": len(rows),
            "max_steps": STEPS,
            "learning_rate": LR,
            "logging_steps": 1,
            "save_steps": 0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "disable_progress_bar": True,
            "use_cpu": True,
            **variant,
        },
    )
    result = train(TPO(), config, train_dataset=copy.deepcopy(rows))
    return [{"loss": r["loss"], "grad_norm": r["grad_norm"]} for r in result.log_history if "loss" in r]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main() -> int:
    import transformers
    import trl
    from posttrain.testing import build_tiny_model

    warnings.filterwarnings("ignore")
    rows = triples()
    details: dict = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "setup": f"tiny Llama (hidden 32, 2 layers), {len(rows)} triples, full batch, {STEPS} steps, "
        f"lr {LR}, fp32 CPU, AdamW, linear schedule, clip 1.0; references of equal length",
        "variants": {},
    }
    worst_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", seed=SEED)
        runs = [(v["loss_type"], v, rows) for v in VARIANTS]
        runs.append(("sigmoid, unequal references (informational)", VARIANTS[0], triples(equal_references=False)))
        for k, (name, variant, data) in enumerate(runs):
            theirs = run_trl(model_dir, tmp / f"trl-{k}", data, variant)
            ours = run_posttrain(model_dir, tmp / f"posttrain-{k}", data, variant)
            if len(theirs) != STEPS or len(ours) != STEPS:
                print(f"{name}: expected {STEPS} steps, got {len(theirs)} (TRL) and {len(ours)} (posttrain)")
                return 1
            print(
                f"\n{name} ({variant})\n{'step':>4} {'loss (TRL 1.16)':>16} {'loss (posttrain)':>17} "
                f"{'rel diff':>9} {'grad_norm rel':>13}"
            )
            worst = {"loss": 0.0, "grad_norm": 0.0}
            for step, (a, b) in enumerate(zip(theirs, ours), start=1):
                diffs = {k: rel(a[k], b[k]) for k in worst}
                worst = {k: max(worst[k], diffs[k]) for k in worst}
                print(
                    f"{step:>4} {a['loss']:>16.8f} {b['loss']:>17.8f} {diffs['loss']:>9.2e} {diffs['grad_norm']:>13.2e}"
                )
            counted = k < len(VARIANTS)
            if counted:
                worst_all = max(worst_all, worst["loss"])
            details["variants"][name] = {
                "config": variant,
                "counted": counted,
                "max_rel_diff_loss": worst["loss"],
                "max_rel_diff_grad_norm": worst["grad_norm"],
                "per_step": [{"step": i + 1, "trl": a, "posttrain": b} for i, (a, b) in enumerate(zip(theirs, ours))],
            }
    passed = worst_all <= TARGET
    result = {
        "method": "tpo",
        "trl_version": trl.__version__,
        "steps": STEPS,
        "max_rel_diff": worst_all,
        "target": TARGET,
        "passed": passed,
        "details": details,
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} trl.experimental.tpo.TPOTrainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={
            name: ([s["trl"]["loss"] for s in v["per_step"]], [s["posttrain"]["loss"] for s in v["per_step"]])
            for name, v in result["details"]["variants"].items()
            if v.get("counted", True)
        },
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(
        f"\nmax relative loss difference over {len(VARIANTS)} variants: {worst_all:.2e} (target {TARGET:g}): "
        f"{'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
