"""Per-step loss parity of posttrain-dpo against TRL 1.16's DPOTrainer.

Same tiny model (built locally), same rows and hyperparameters, fp32 on CPU, full batch, 10 steps,
for several loss types. Passes when every step's loss agrees within a relative 1e-4.

The ``images_*`` cases train a tiny LLaVA (``posttrain.testing.build_tiny_vlm``, the vision-language model of the
image tests) on preference rows with images (``colour_rows``: a coloured shape, two on every third row; chosen is
its colour, rejected another): conversational rows with ``{"type": "image"}`` parts and standard rows with the
``<image>`` token, whose chosen and rejected end with the EOS text (TRL 1.16's vision path skips the dataset
preparation that appends EOS to standard rows; posttrain appends it unless it is there). No ``max_length``: TRL
computes pixel values per batch and does not truncate image rows.

Run (needs the parity environment, where trl==1.16.0 is installed beside posttrain)::

    /work/parity-venv/bin/python plugins/posttrain-dpo/parity/parity_dpo.py

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

TARGET = 1e-4
STEPS = 10
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
# name -> (DPO fields, row kind)
CASES = {
    "sigmoid": ({"loss_type": ["sigmoid"]}, "standard"),
    "ipo": ({"loss_type": ["ipo"]}, "standard"),
    "sigmoid_conversational": ({"loss_type": ["sigmoid"]}, "conversational"),
    "sigmoid_precomputed_ref": ({"loss_type": ["sigmoid"], "precompute_ref_log_probs": True}, "standard"),
    "hinge": ({"loss_type": ["hinge"]}, "standard"),
    "robust": ({"loss_type": ["robust"], "label_smoothing": 0.1}, "standard"),
    "bco_pair": ({"loss_type": ["bco_pair"]}, "standard"),
    "sppo_hard": ({"loss_type": ["sppo_hard"]}, "standard"),
    "nca_pair": ({"loss_type": ["nca_pair"]}, "standard"),
    "apo_zero": ({"loss_type": ["apo_zero"]}, "standard"),
    "apo_down": ({"loss_type": ["apo_down"]}, "standard"),
    # MPO mix; chosen completions of equal length, where the per-pair sft term equals TRL's batch token mean
    "mpo_sigmoid_bco_sft": ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, "equal"),
    "images_sigmoid_conversational": ({"loss_type": ["sigmoid"], "max_length": None}, "images"),
    "images_sigmoid_standard": ({"loss_type": ["sigmoid"], "max_length": None}, "images_standard"),
    "images_ipo_conversational": ({"loss_type": ["ipo"], "max_length": None}, "images"),
}


def has_images(rows: list[dict]) -> bool:
    return "images" in rows[0]


def make_rows(kind: str, n: int = 12) -> list[dict]:
    if kind.startswith("images"):
        from posttrain.testing import colour_rows

        conversational = kind == "images"
        rows = [
            {k: v for k, v in r.items() if k != "answer"}
            for r in colour_rows(n, "preference", seed=0, conversational=conversational)
        ]
        if not conversational:
            rows = [{**r, "chosen": r["chosen"] + "<|end|>", "rejected": r["rejected"] + "<|end|>"} for r in rows]
        return rows
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        prompt = f"Say {word}:"
        chosen = f" {word} yes" if kind != "equal" else " yes!"
        rejected = f" {word[::-1]} no{'o' * rng.randint(0, 4)}"
        if kind == "conversational":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def run_trl(model_dir: Path, rows: list[dict], fields: dict, out: Path) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoProcessor, AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(rows),
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
    # a vision-language model's processor (tokenizer + image processor) is TRL's processing_class, as posttrain's
    processing = AutoProcessor if has_images(rows) else AutoTokenizer
    trainer = DPOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processing.from_pretrained(model_dir),
    )
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):  # the exact per-step loss (the logged one is rounded)
        loss = compute_loss(model, inputs, *a, **k)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    for callback in (PrinterCallback, ProgressCallback):  # our own table is the output
        trainer.remove_callback(callback)
    trainer.train()
    # saved and read back: the checkpoint's parameter names, which posttrain's saved model has too (a
    # vision-language model's names in memory differ from its checkpoint's)
    trainer.model.save_pretrained(out / "final")
    from safetensors.torch import load_file

    return losses, load_file(out / "final" / "model.safetensors")


def run_posttrain(model_dir: Path, rows: list[dict], fields: dict, out: Path) -> tuple[list[float], dict]:
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_dpo import DPO, DPOConfig
    from safetensors.torch import load_file

    values = {
        "model": str(model_dir),
        "output_dir": str(out),
        "per_device_train_batch_size": len(rows),
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 0,
        "use_cpu": True,
        "disable_progress_bar": True,
        **COMMON,
        **fields,
    }
    result = train(DPO(), build_config(DPOConfig, values), train_dataset=rows)
    return [row["loss"] for row in result.log_history if "loss" in row], load_file(out / "model.safetensors")


def main() -> int:
    import transformers
    import trl
    from posttrain.testing import build_tiny_model, build_tiny_vlm

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="parity-dpo-"))
    text_model = build_tiny_model(work / "model", hidden_size=32, num_layers=2)
    vision_model = build_tiny_vlm(work / "vlm")
    details, worst_overall = {}, 0.0
    for name, (fields, kind) in CASES.items():
        if sys.argv[1:] and name not in sys.argv[1:]:  # a few cases by name, while working on them
            continue
        rows = make_rows(kind)
        model_dir = vision_model if has_images(rows) else text_model
        trl_losses, trl_weights = run_trl(model_dir, rows, fields, work / f"trl-{name}")
        pt_losses, pt_weights = run_posttrain(model_dir, rows, fields, work / f"pt-{name}")
        assert len(trl_losses) == len(pt_losses) == STEPS, (name, len(trl_losses), len(pt_losses))
        rel = [abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(trl_losses, pt_losses)]
        weight_diff = max((trl_weights[k] - pt_weights[k]).abs().max().item() for k in pt_weights)
        worst_overall = max(worst_overall, max(rel))
        details[name] = {
            "trl": trl_losses,
            "posttrain": pt_losses,
            "max_rel_diff": max(rel),
            "final_weight_max_abs_diff": weight_diff,
        }
        print(f"\n== {name} ({kind} rows, {fields})")
        print(f"{'step':>4} {'trl':>14} {'posttrain':>14} {'rel diff':>10}")
        for step, (a, b, r) in enumerate(zip(trl_losses, pt_losses, rel), start=1):
            print(f"{step:>4} {a:>14.8f} {b:>14.8f} {r:>10.2e}")
        print(f"max rel diff {max(rel):.2e}; final weights max abs diff {weight_diff:.2e}")
    passed = worst_overall <= TARGET
    result = {
        "method": "dpo",
        "compared": f"per-step training loss over {STEPS} steps on a tiny model, and on a tiny LLaVA with rows "
        "holding images (images_* cases), fp32 CPU",
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
            "batch": "full (12 pairs, accumulation 1)",
            **COMMON,
            "cases": details,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} DPOTrainer",
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
