"""Parity of posttrain-bco with the last TRL BCO trainer (opt-in; not part of the test suite).

TRL 1.16 no longer ships BCO (``trl.experimental.bco`` was removed in huggingface/trl#7136), so this script checks
posttrain-bco against an independent restatement of that trainer's last code, run through ``transformers.Trainer``
as ``BCOTrainer`` was: its tokenization (prompt / prompt+completion, EOS appended, prompt labels -100), its
``get_batch_logps``, its ``RunningMoments`` (mean/var/count starting at 0/1/1e-24, updated with every
micro-batch's rewards before the loss), ``bco_loss`` and the per-micro-batch ``nanmean``.

Both sides train the same tiny Llama on the same 16 unpaired rows (10 desirable, 6 undesirable, so the
count-weighted running mean is exercised) for 10 full-batch steps in fp32 on CPU, with AdamW, a linear schedule
and gradient clipping at 1.0. The script prints the per-step loss and delta, writes ``result.json`` next to
itself and exits 1 if the largest relative loss difference exceeds 1e-4.

Run:  /work/parity-venv/bin/python plugins/posttrain-bco/parity/parity_bco.py
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
import torch.nn.functional as F

STEPS, LR, BETA, SEED, TARGET = 10, 5e-4, 0.1, 0, 1e-4
ROWS = [
    {"prompt": "Word: kzl\nReply: ", "completion": "aiuo", "label": True},
    {"prompt": "Word: rcp\nReply: ", "completion": "zlwzq", "label": False},
    {"prompt": "Name a vowel: ", "completion": "e", "label": True},
    {"prompt": "Word: ugo\nReply: ", "completion": "aiou", "label": True},
    {"prompt": "Spell it: ", "completion": "xkcd", "label": False},
    {"prompt": "Word: tpe\nReply: ", "completion": "eeaio", "label": True},
    {"prompt": "Hi! ", "completion": "ouia", "label": True},
    {"prompt": "Word: bbb\nReply: ", "completion": "bcd", "label": False},
    {"prompt": "Q: ", "completion": "iou", "label": True},
    {"prompt": "Word: zap\nReply: ", "completion": "aa", "label": True},
    {"prompt": "Say something: ", "completion": "prst", "label": False},
    {"prompt": "Word: mix\nReply: ", "completion": "ioea", "label": True},
    {"prompt": "Go: ", "completion": "kl", "label": False},
    {"prompt": "Word: qrs\nReply: ", "completion": "uuo", "label": True},
    {"prompt": "Answer: ", "completion": "mnpq", "label": False},
    {"prompt": "Word: end\nReply: ", "completion": "eia", "label": True},
]


# -- the independent restatement of TRL's last BCO trainer --------------------------------------------------


class RunningMoments:
    """TRL's RunningMoments (single process): running mean/var of a stream, count starting at 1e-24."""

    def __init__(self) -> None:
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        self.mean += (delta * xs_count / tot_count).item()
        new_var = (old_sum + new_sum) / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count


def trl_tokenize(tokenizer, row: dict) -> dict:
    """BCO's `_tokenize` + `_process_tokens` for a decoder-only model, without truncation (rows are short)."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full_ids[:start]:  # a token merged across the boundary
        start -= 1
    prompt_ids, answer_ids = full_ids[:start], full_ids[start:]
    if tokenizer.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    ids = prompt_ids + answer_ids
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    return {"completion_input_ids": ids, "completion_labels": labels, "label": row["label"]}


def trl_collate(pad_token_id: int):
    """DPODataCollatorWithPadding for these columns: right-pad ids with pad, labels with -100, mask with 0."""

    def collate(examples: list[dict]) -> dict:
        width = max(len(e["completion_input_ids"]) for e in examples)
        out = {"completion_input_ids": [], "completion_attention_mask": [], "completion_labels": []}
        for e in examples:
            n, pad = len(e["completion_input_ids"]), width - len(e["completion_input_ids"])
            out["completion_input_ids"].append(e["completion_input_ids"] + [pad_token_id] * pad)
            out["completion_attention_mask"].append([1] * n + [0] * pad)
            out["completion_labels"].append(e["completion_labels"] + [-100] * pad)
        batch = {k: torch.tensor(v) for k, v in out.items()}
        batch["label"] = [e["label"] for e in examples]
        return batch

    return collate


def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * loss_mask).sum(-1)


def run_reference(model_dir: Path, out_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    running = RunningMoments()
    records: list[dict] = []

    class BCOLikeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            def forward(m):
                logits = m(inputs["completion_input_ids"], attention_mask=inputs["completion_attention_mask"]).logits
                logps = get_batch_logps(logits, inputs["completion_labels"])
                chosen = [i for i, lab in enumerate(inputs["label"]) if lab is True]
                rejected = [i for i, lab in enumerate(inputs["label"]) if lab is False]
                return logps[chosen, ...], logps[rejected, ...]

            policy_chosen, policy_rejected = forward(model)
            with torch.no_grad():
                ref_chosen, ref_rejected = forward(ref_model)
            chosen_rewards = BETA * (policy_chosen - ref_chosen)
            rejected_rewards = BETA * (policy_rejected - ref_rejected)
            running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
            delta = torch.as_tensor(running.mean, device=chosen_rewards.device)
            chosen_losses = -F.logsigmoid(chosen_rewards - delta)
            rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
            loss = torch.cat((chosen_losses, rejected_losses), 0).nanmean()
            records.append({"loss": loss.item(), "delta": running.mean})
            return loss

    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(ROWS),
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
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    dataset = [trl_tokenize(tokenizer, row) for row in ROWS]
    trainer = BCOLikeTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=trl_collate(tokenizer.pad_token_id)
    )
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return [{**r, "grad_norm": float(g)} for r, g in zip(records, norms)]


# -- posttrain-bco ------------------------------------------------------------------------------------------


def run_posttrain(model_dir: Path, out_dir: Path) -> list[dict]:
    from posttrain.config import build_config
    from posttrain.loop import train
    from posttrain_bco import BCO, BCOConfig

    config = build_config(
        BCOConfig,
        {
            "model": str(model_dir),
            "output_dir": str(out_dir),
            "beta": BETA,
            "max_length": 1024,
            "per_device_train_batch_size": len(ROWS),
            "max_steps": STEPS,
            "learning_rate": LR,
            "logging_steps": 1,
            "save_steps": 0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "disable_progress_bar": True,
            "use_cpu": True,
        },
    )
    result = train(BCO(), config, train_dataset=copy.deepcopy(ROWS))
    return [
        {"loss": r["loss"], "delta": r["delta"], "grad_norm": r["grad_norm"]} for r in result.log_history if "loss" in r
    ]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main() -> int:
    import transformers
    from posttrain.testing import build_tiny_model

    warnings.filterwarnings("ignore")
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    bco_in_trl = (
        importlib.util.find_spec("trl.experimental.bco") is not None if trl_version != "not installed" else False
    )
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", seed=SEED)
        reference = run_reference(model_dir, tmp / "reference")
        ours = run_posttrain(model_dir, tmp / "posttrain")
    if len(reference) != STEPS or len(ours) != STEPS:
        print(f"expected {STEPS} steps, got {len(reference)} (reference) and {len(ours)} (posttrain)")
        return 1
    print(
        f"{'step':>4} {'loss (TRL formula)':>19} {'loss (posttrain)':>17} {'rel diff':>9} {'delta (TRL)':>12} "
        f"{'delta (posttrain)':>17} {'grad_norm rel':>13}"
    )
    worst = {"loss": 0.0, "delta": 0.0, "grad_norm": 0.0}
    for step, (a, b) in enumerate(zip(reference, ours), start=1):
        diffs = {k: rel(a[k], b[k]) if k != "delta" or abs(a[k]) > 1e-9 else abs(a[k] - b[k]) for k in worst}
        worst = {k: max(worst[k], diffs[k]) for k in worst}
        print(
            f"{step:>4} {a['loss']:>19.8f} {b['loss']:>17.8f} {diffs['loss']:>9.2e} {a['delta']:>12.3e} "
            f"{b['delta']:>17.3e} {diffs['grad_norm']:>13.2e}"
        )
    passed = worst["loss"] <= TARGET
    result = {
        "method": "bco",
        "trl_version": trl_version,
        "steps": STEPS,
        "max_rel_diff": worst["loss"],
        "target": TARGET,
        "passed": passed,
        "details": {
            "compared_against": "independent restatement of the last TRL BCOTrainer (removed before 1.16, "
            "huggingface/trl#7136) run through transformers.Trainer",
            "bco_in_installed_trl": bco_in_trl,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "setup": f"tiny Llama (hidden 32, 2 layers), {len(ROWS)} unpaired rows (10 desirable, 6 undesirable), "
            f"full batch, {STEPS} steps, lr {LR}, beta {BETA}, fp32 CPU, AdamW, linear schedule, clip 1.0",
            "max_rel_diff_delta": worst["delta"],
            "max_rel_diff_grad_norm": worst["grad_norm"],
            "per_step": [
                {"step": i + 1, "reference": a, "posttrain": b} for i, (a, b) in enumerate(zip(reference, ours))
            ],
        },
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference="the last TRL BCOTrainer (removed before TRL 1.16, huggingface/trl#7136), restated on transformers.Trainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={
            "bco": (
                [s["reference"]["loss"] for s in result["details"]["per_step"]],
                [s["posttrain"]["loss"] for s in result["details"]["per_step"]],
            )
        },
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(
        f"max relative loss difference {worst['loss']:.2e} (target {TARGET:g}): {'PASS' if passed else 'FAIL'}; "
        f"delta {worst['delta']:.2e}, grad_norm {worst['grad_norm']:.2e}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
