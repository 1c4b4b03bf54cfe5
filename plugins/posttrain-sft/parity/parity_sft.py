"""Per-step loss parity of posttrain's `sft` against TRL 1.16's SFTTrainer.

Both train the same tiny Llama (built locally, fp32, CPU) on the same rows with the same hyperparameters: full batch
(every row in every step, so the data order cannot differ), AdamW, linear decay from 1e-3, clipping at 1.0, 10 steps.
Five cases cover the dataset types and options: standard text, conversational prompt-completion (completion-only
loss), conversations with assistant_only_loss, packing (best-fit decreasing, padding-free) and the DFT loss. Three
more train a tiny LLaVA (``posttrain.testing.build_tiny_vlm``, the vision-language model of the image tests) on rows
with images (``colour_rows``: one or two coloured-shape images per row): conversational prompt-completion,
two-exchange conversations with assistant_only_loss, and standard prompt-completion with the ``<image>`` token (its completions
end with the EOS text, which TRL's vision collator does not append); TRL runs them
with its vision data collator (pixel values computed per batch), without ``max_length`` (TRL refuses to truncate
image rows the way it truncates text).
TRL's loss is read inside `compute_loss` (its logged loss is rounded to 4 decimals).

Run from the repository root, in a venv with trl==1.16.0 and this plugin installed:

    /work/parity-venv/bin/python plugins/posttrain-sft/parity/parity_sft.py

Prints a per-step table, writes parity/result.json and exits 1 when the max relative difference exceeds 1e-4.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("CI", "1")  # TRL skips its usage ping under CI; this machine has no network anyway
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from posttrain.loop import train  # noqa: E402
from posttrain.testing import build_tiny_model, build_tiny_vlm, build_tokenizer, colour_rows  # noqa: E402
from posttrain_sft import SFT, SFTConfig, prepare_rows  # noqa: E402

TARGET, STEPS, LR, MAX_LENGTH = 1e-4, 10, 1e-3, 64
HERE = Path(__file__).resolve().parent
FACTS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
]
TEXT = [
    {"text": f"{'the cat sat on the mat ' * (1 + i % 3)}{country} {city}"} for i, (country, city) in enumerate(FACTS)
]
PROMPT_COMPLETION = [
    {
        "prompt": [{"role": "user", "content": f"Capital of {country}?"}],
        "completion": [{"role": "assistant", "content": city}],
    }
    for country, city in FACTS
]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Be brief." * (i % 2)},
            {"role": "user", "content": f"Capital of {country}?"},
            {"role": "assistant", "content": city},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, " + city},
        ]
    }
    for i, (country, city) in enumerate(FACTS)
]


def image_rows(fmt: str, conversational: bool = True) -> list[dict]:
    """Eight rows of the coloured-shape task (rows 2 and 5 hold two images), without the ``answer`` column.

    Standard completions end with the EOS text: TRL 1.16's vision collator does not append EOS to a standard
    completion (its text path does, and so does posttrain, unless the completion already ends with it).
    """
    rows = []
    for row in colour_rows(8, fmt, seed=0, conversational=conversational):
        row = {k: v for k, v in row.items() if k != "answer"}
        if not conversational:
            row["completion"] += "<|end|>"
        if fmt == "language_modeling":  # a second exchange: two assistant spans carry the loss
            colour = row["messages"][-1]["content"][0]["text"]
            row["messages"] += [
                {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Yes, {colour}."}]},
            ]
        rows.append(row)
    return rows


CASES = {
    "text": (TEXT, {}),
    "prompt_completion": (PROMPT_COMPLETION, {}),
    "assistant_only": (MESSAGES, {"assistant_only_loss": True}),
    "packing": (TEXT, {"packing": True}),
    "dft": (TEXT, {"loss_type": "dft"}),
    "images_prompt_completion": (image_rows("prompt_completion"), {"max_length": None}),
    "images_assistant_only": (image_rows("language_modeling"), {"assistant_only_loss": True, "max_length": None}),
    "images_standard": (image_rows("prompt_completion", conversational=False), {"max_length": None}),
}


def has_images(rows: list[dict]) -> bool:
    return "images" in rows[0]


class RecordingSFTTrainer(trl.SFTTrainer):
    """TRL's trainer, recording the unrounded loss of every training forward (one per step at full batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.step_losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def run_trl(model_dir: Path, rows: list[dict], options: dict, out: Path) -> tuple[list[float], list[dict]]:
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        per_device_train_batch_size=len(rows),
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        model_init_kwargs={"dtype": "float32"},
        **{"max_length": MAX_LENGTH, **options},
    )
    # a vision-language model's processor (tokenizer + image processor) is TRL's processing_class, as posttrain's
    processor = transformers.AutoProcessor.from_pretrained(model_dir) if has_images(rows) else None
    trainer = RecordingSFTTrainer(
        model=str(model_dir), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor
    )
    trainer.train()
    return trainer.step_losses, [r for r in trainer.state.log_history if "loss" in r]


def run_posttrain(model_dir: Path, rows: list[dict], options: dict, out: Path) -> list[dict]:
    options = {"max_length": MAX_LENGTH, **options}
    if has_images(rows):  # no packing: one training row per dataset row
        n_rows = len(rows)
    else:
        n_rows = len(prepare_rows(datasets.Dataset.from_list(rows), build_tokenizer(), SFTConfig(**options)))
    config = SFTConfig(
        model=str(model_dir),
        output_dir=str(out),
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        per_device_train_batch_size=n_rows,
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
        dtype="float32",
        **options,
    )
    return train(SFT(), config, train_dataset=rows).log_history


def main() -> int:
    torch.set_num_threads(1)  # tiny model: one thread is fastest and avoids spin-waiting on a busy machine
    datasets.disable_progress_bars()
    details, worst = {}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        text_model = build_tiny_model(Path(tmp) / "model")
        vision_model = build_tiny_vlm(Path(tmp) / "vlm")
        for name, (rows, options) in CASES.items():
            if sys.argv[1:] and name not in sys.argv[1:]:  # a few cases by name, while working on them
                continue
            model_dir = vision_model if has_images(rows) else text_model
            trl_losses, trl_logs = run_trl(model_dir, rows, options, Path(tmp) / f"trl-{name}")
            ours = run_posttrain(model_dir, rows, options, Path(tmp) / f"pt-{name}")
            our_losses = [r["loss"] for r in ours]
            assert len(trl_losses) == len(our_losses) == STEPS, (name, len(trl_losses), len(our_losses))
            rel = [abs(a - b) / abs(b) for a, b in zip(our_losses, trl_losses)]
            print(f"\n{name} {options or ''}\n step  posttrain     TRL 1.16      rel diff   accuracy (pt / TRL)")
            for i, (a, b, r) in enumerate(zip(our_losses, trl_losses, rel)):
                acc = f"{ours[i]['mean_token_accuracy']:.4f} / {trl_logs[i]['mean_token_accuracy']:.4f}"
                print(f" {i + 1:>4}  {a:.8f}  {b:.8f}  {r:.2e}   {acc}")
            grad_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(ours, trl_logs))
            same_tokens = [r["num_tokens"] for r in ours] == [r["num_tokens"] for r in trl_logs]
            print(f" max rel diff: loss {max(rel):.2e}, grad_norm {grad_rel:.2e}; num_tokens identical: {same_tokens}")
            details[name] = {
                "options": options,
                "max_rel_diff": max(rel),
                "max_rel_diff_grad_norm": grad_rel,
                "num_tokens_identical": same_tokens,
                "posttrain_loss": our_losses,
                "trl_loss": trl_losses,
                "posttrain_grad_norm": [r["grad_norm"] for r in ours],
                "trl_grad_norm": [r["grad_norm"] for r in trl_logs],
            }
            worst = max(worst, max(rel))
    passed = worst <= TARGET
    result = {
        "method": "sft",
        "compared": f"per-step training loss over {STEPS} steps on a tiny model, and on a tiny LLaVA with rows "
        "holding images (images_* cases), fp32 CPU",
        "trl_version": trl.__version__,
        "steps": STEPS,
        "max_rel_diff": worst,
        "target": TARGET,
        "passed": passed,
        "details": {
            "setup": f"tiny Llama (hidden 32, 2 layers), fp32, CPU, full batch of 8 rows, AdamW lr {LR} "
            f"linear, max_grad_norm 1.0, max_length {MAX_LENGTH}, torch {torch.__version__}; images_* cases: tiny "
            "LLaVA (1-layer CLIP tower 32x32 px, 4 tokens per image, projector, 2-layer Llama), no max_length",
            "cases": details,
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} SFTTrainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={name: (c["trl_loss"], c["posttrain_loss"]) for name, c in result["details"]["cases"].items()},
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(
        f"\nmax relative per-step loss difference over {len(CASES)} cases x {STEPS} steps: {worst:.2e} "
        f"(target {TARGET:.0e}) -> {'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
