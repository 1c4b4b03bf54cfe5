"""Parity of posttrain-distill against TRL 1.16's DistillationTrainer on the deterministic part.

Generation is the only random part of on-policy distillation, so it is fixed: TRL's sampling step
(``_generate_single_turn``) is replaced by a lookup that returns a fixed completion for each prompt, and posttrain
trains off-policy (``lmbda 0``) on the same completions given as dataset rows. Everything after generation is
compared: prompt tokenization, left padding, both forward passes, the chunked generalised JSD (TRL's kernel, torch
fallback on CPU), the token normalisation, the optimizer and the schedule. Same tiny student and teacher (built
locally), fp32 on CPU, full batch, 10 steps, for beta 1 (reverse KL, default), 0 (forward KL) and 0.5, and a
temperature below 1. Passes when every step's loss agrees within a relative 1e-4.

Run (needs the parity environment, where trl==1.16.0 is installed beside posttrain)::

    /work/parity-venv/bin/python plugins/posttrain-distill/parity/parity_distill.py

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
COMMON = {
    "learning_rate": 5e-3,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 0,
    "max_completion_length": 16,
}
CASES = {
    "reverse_kl_beta1": {"beta": 1.0, "temperature": 1.0},
    "forward_kl_beta0": {"beta": 0.0, "temperature": 1.0},
    "jsd_beta0.5": {"beta": 0.5, "temperature": 1.0},
    "jsd_beta0.3_temperature0.7": {"beta": 0.3, "temperature": 0.7},
}


def make_rows(n: int = 12) -> list[dict]:
    """Prompts of different lengths (so TRL and posttrain both left-pad) and fixed completions of different lengths."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        completion = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 12)))
        rows.append({"prompt": f"Echo {word}:", "completion": completion})
    return rows


def run_trl(model_dir: Path, teacher_dir: Path, rows: list[dict], fields: dict, out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fixed = {
        tuple(tokenizer(r["prompt"]).input_ids): tokenizer(r["completion"] + tokenizer.eos_token).input_ids
        for r in rows
    }
    args = DistillationConfig(
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
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": "float32"},
        **{**COMMON, **fields},
    )
    trainer = DistillationTrainer(
        model=str(model_dir),
        teacher_model=str(teacher_dir),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
        processing_class=tokenizer,
    )
    # the fixed "generation": each prompt's completion, whatever the sampler's order
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: [list(fixed[tuple(p)]) for p in prompt_ids]
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):  # the exact per-step loss (the logged one is rounded)
        loss = compute_loss(model, inputs, *a, **k)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def run_posttrain(model_dir: Path, teacher_dir: Path, rows: list[dict], fields: dict, out: Path):
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_distill import Distill, DistillConfig
    from safetensors.torch import load_file

    values = {
        "model": str(model_dir),
        "teacher_model": str(teacher_dir),
        "output_dir": str(out),
        "lmbda": 0.0,
        "per_device_train_batch_size": len(rows),
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 0,
        "use_cpu": True,
        "disable_progress_bar": True,
        **COMMON,
        **fields,
    }
    history = train(Distill(), build_config(DistillConfig, values), train_dataset=rows).log_history
    return [row["loss"] for row in history if "loss" in row], load_file(out / "model.safetensors")


def main() -> int:
    import transformers
    import trl
    from posttrain.testing import build_tiny_model

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="parity-distill-"))
    model_dir = build_tiny_model(work / "student", hidden_size=32, num_layers=2, seed=0)
    teacher_dir = build_tiny_model(work / "teacher", hidden_size=48, num_layers=3, seed=1)  # wider and deeper
    rows = make_rows()
    details, worst_overall = {}, 0.0
    for name, fields in CASES.items():
        trl_losses, trl_weights = run_trl(model_dir, teacher_dir, rows, fields, work / f"trl-{name}")
        pt_losses, pt_weights = run_posttrain(model_dir, teacher_dir, rows, fields, work / f"pt-{name}")
        assert len(trl_losses) == len(pt_losses) == STEPS, (name, len(trl_losses), len(pt_losses))
        rel = [abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(trl_losses, pt_losses)]
        weight_diff = max((trl_weights[k] - pt_weights[k]).abs().max().item() for k in pt_weights)
        worst_overall = max(worst_overall, max(rel))
        details[name] = {
            "fields": fields,
            "trl": trl_losses,
            "posttrain": pt_losses,
            "max_rel_diff": max(rel),
            "final_weight_max_abs_diff": weight_diff,
        }
        print(f"\n== {name} ({fields})")
        print(f"{'step':>4} {'trl':>14} {'posttrain':>14} {'rel diff':>10}")
        for step, (a, b, r) in enumerate(zip(trl_losses, pt_losses, rel), start=1):
            print(f"{step:>4} {a:>14.8f} {b:>14.8f} {r:>10.2e}")
        print(f"max rel diff {max(rel):.2e}; final weights max abs diff {weight_diff:.2e}")
    passed = worst_overall <= TARGET
    result = {
        "method": "distill",
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
            "rows": len(rows),
            "batch": "full (12 prompts, accumulation 1)",
            "student": "llama hidden 32, 2 layers",
            "teacher": "llama hidden 48, 3 layers",
            "generation": "fixed completions (TRL: _generate_single_turn replaced; posttrain: lmbda 0)",
            **COMMON,
            "cases": details,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} DistillationTrainer",
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
