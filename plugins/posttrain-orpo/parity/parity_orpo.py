"""Per-step loss parity of posttrain-orpo with TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

Run (needs a venv with trl==1.16.0, posttrain and this plugin installed; TRL is not a dependency)::

    /work/parity-venv/bin/python plugins/posttrain-orpo/parity/parity_orpo.py

Both trainers start from the same tiny random model, fp32 on CPU, full batch (every row in every step),
AdamW, linear schedule, clipping at 1.0. TRL's loss is read from ``compute_loss`` itself (its logged loss
is rounded), posttrain's from the run's log. The main fixture gives every chosen sequence the same
token count, where TRL's batch token mean of the NLL equals posttrain's per-pair mean exactly; a second,
informational run with unequal chosen lengths measures how far the two normalisations drift apart.
Writes ``result.json`` beside this file and exits 1 if the main fixture misses the 1e-4 target.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("CI", "1")  # no telemetry ping from TRL
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_EXPERIMENTAL_SILENCE", "orpo")
warnings.filterwarnings("ignore")

STEPS, TARGET, LR, MAX_LENGTH = 10, 1e-4, 1e-3, 64  # beta: the default 0.1
HERE = Path(__file__).resolve().parent


def fixture(equal_chosen: bool = True, conversational: bool = False) -> list[dict]:
    """8 preference rows: prompt "Say i:", chosen 5 characters when ``equal_chosen``, rejected 2-5."""
    words = ["hello", "world", "quick", "brown", "jumps", "lazy", "dog", "fox"]
    rows = []
    for i, word in enumerate(words):
        row = {
            "prompt": f"Say {i}:",
            "chosen": word.ljust(5, "!") if equal_chosen else word + "!" * (i % 4),
            "rejected": word[::-1][: 2 + i % 6],
        }
        if conversational:
            row = {k: [{"role": "user" if k == "prompt" else "assistant", "content": v}] for k, v in row.items()}
        rows.append(row)
    return rows


def shared_settings(rows: list[dict]) -> dict:
    """Hyperparameters both trainers name the same way."""
    return dict(
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        per_device_train_batch_size=len(rows),
        max_length=MAX_LENGTH,
        logging_steps=1,
        seed=0,
    )


def trl_losses(model_dir: Path, rows: list[dict], out: Path) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    losses: list[float] = []

    class Recording(ORPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    args = ORPOConfig(
        output_dir=str(out),
        gradient_accumulation_steps=1,
        weight_decay=0.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_dropout=True,
        disable_tqdm=True,
        log_level="error",
        remove_unused_columns=False,
        **shared_settings(rows),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.Dataset.from_list(rows)
    trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return losses


def posttrain_losses(model_dir: Path, rows: list[dict], out: Path) -> list[float]:
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_orpo import ORPO, ORPOConfig

    settings = {"model": str(model_dir), "output_dir": str(out), "save_steps": 0, "disable_progress_bar": True}
    config = build_config(ORPOConfig, {**settings, **shared_settings(rows)})
    result = train(ORPO(), config, train_dataset=rows)
    return [row["loss"] for row in result.log_history if "loss" in row]


def compare(model_dir: Path, rows: list[dict], work: Path, name: str) -> tuple[float, list[dict]]:
    theirs = trl_losses(model_dir, rows, work / f"trl-{name}")
    ours = posttrain_losses(model_dir, rows, work / f"posttrain-{name}")
    table = []
    for step, (a, b) in enumerate(zip(theirs, ours), start=1):
        table.append({"step": step, "trl": a, "posttrain": b, "rel_diff": abs(a - b) / max(abs(a), abs(b), 1e-12)})
    if len(theirs) != len(ours):
        raise SystemExit(f"{name}: TRL ran {len(theirs)} steps, posttrain {len(ours)}")
    print(f"\n{name}\n step  {'trl':>12}  {'posttrain':>12}  rel_diff")
    for row in table:
        print(f" {row['step']:>4}  {row['trl']:12.7f}  {row['posttrain']:12.7f}  {row['rel_diff']:.2e}")
    return max(row["rel_diff"] for row in table), table


def main() -> int:
    import datasets
    import torch
    import transformers
    import trl
    from posttrain.testing import build_tiny_model

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", hidden_size=64)
        runs = {
            "standard": compare(model_dir, fixture(), work, "standard rows (pass/fail)"),
            "conversational": compare(model_dir, fixture(conversational=True), work, "conversational rows (pass/fail)"),
        }
        drift, drift_table = compare(model_dir, fixture(equal_chosen=False), work, "unequal chosen lengths (info)")
    worst = max(w for w, _ in runs.values())
    passed = worst <= TARGET
    result = {
        "method": "orpo",
        "trl_version": trl.__version__,
        "steps": STEPS,
        "max_rel_diff": worst,
        "target": TARGET,
        "passed": passed,
        "details": {
            "fixture": "8 rows, standard and conversational: prompt 'Say i:', chosen 5 characters + EOS, rejected "
            "2-5 + EOS; tiny llama (hidden 64, 2 layers), fp32 CPU, batch 8 = full batch, lr 1e-3 linear, beta 0.1",
            "max_rel_diff_by_run": {name: w for name, (w, _) in runs.items()},
            "per_step": {name: t for name, (_, t) in runs.items()},
            "unequal_chosen_lengths_max_rel_diff": drift,
            "unequal_chosen_lengths_note": "TRL averages the NLL over all chosen tokens of the batch, posttrain "
            "per pair then over pairs; expected to differ when lengths differ",
            "unequal_per_step": drift_table,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} trl.experimental.orpo.ORPOTrainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={
            name: ([s["trl"] for s in steps], [s["posttrain"] for s in steps])
            for name, steps in result["details"]["per_step"].items()
        },
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(
        f"\nmax relative difference {worst:.2e} (target {TARGET:.0e}): {'PASS' if passed else 'FAIL'}; "
        f"unequal chosen lengths (info): {drift:.2e}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
