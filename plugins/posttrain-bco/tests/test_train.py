"""A tiny model learns a synthetic preference with BCO, and the shipped example config runs."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from posttrain.config import build_config, load_config
from posttrain.loop import train
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain_bco import BCO, BCOConfig
from posttrain_bco.data import collate_rows, tokenize_row

VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxz"


def vowel_pairs(n: int, seed: int) -> list[dict]:
    """Paired rows: the desirable reply is 4 random vowels, the undesirable one 4 random consonants."""
    rng = random.Random(seed)
    return [
        {
            "prompt": "Word: " + "".join(rng.choices(VOWELS + CONSONANTS, k=3)) + "\nReply: ",
            "chosen": "".join(rng.choices(VOWELS, k=4)),
            "rejected": "".join(rng.choices(CONSONANTS, k=4)),
        }
        for _ in range(n)
    ]


@torch.no_grad()
def preference_accuracy(model_dir: str | Path, pairs: list[dict]) -> float:
    """Fraction of pairs where the policy gives the chosen reply a higher log-prob than the rejected one
    (both have 4 characters, so the comparison is not biased by length)."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), BCOConfig()).eval()
    rows = []
    for pair in pairs:
        for key in ("chosen", "rejected"):
            prompt_ids, completion_ids = tokenize_row(tokenizer, pair["prompt"], pair[key])
            rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": key == "chosen"})
    batch = collate_rows(rows, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    logps = (torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    chosen, rejected = logps[0::2], logps[1::2]
    return (chosen > rejected).float().mean().item()


def measure_learning(model_dir, out_dir, seed: int = 0) -> dict[str, float]:
    """The run of test_tiny_model_learns_to_prefer_desirable (``benchmarks/calibrate_learning.py bco`` runs it over
    seeds and thread counts)."""
    held_out = vowel_pairs(64, seed=1)
    before = preference_accuracy(model_dir, held_out)
    config = build_config(
        BCOConfig,
        {
            "model": str(model_dir),
            "output_dir": str(out_dir / "run"),
            "max_length": 64,
            "learning_rate": 2e-3,
            "per_device_train_batch_size": 16,
            "max_steps": 15,
            "logging_steps": 5,
            "save_steps": 0,
            "disable_progress_bar": True,
            "seed": seed,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(BCO(), config, train_dataset=vowel_pairs(64, seed=0))
    after = preference_accuracy(out_dir / "run", held_out)
    losses = [row["loss"] for row in result.log_history if "loss" in row]
    margins = [row["rewards/margins"] for row in result.log_history if "rewards/margins" in row]
    return {
        "before": before,
        "after": after,
        "rise": after - before,
        "loss_drop": losses[0] - losses[-1],
        "last_margin": margins[-1],
        "logs_delta": float("delta" in result.log_history[-1]),
    }


def test_tiny_model_learns_to_prefer_desirable(bco_model_dir, tmp_path):
    """Preference accuracy on 64 held-out pairs, computed from the logits (no sampling).

    Calibration (``python benchmarks/calibrate_learning.py bco --seeds 0-4 --threads 1 2``, 2026-11-30, 10 runs):
    accuracy 0.38-0.59 before, 1.0 after in every run, a rise of 0.41 at least (mean 0.53); the loss (steps 11-15
    against 1-5) fell by 0.061 at least, the last reward margin was 0.37 at least. Thresholds: 0.9 after, a rise of
    0.2, a loss drop of 0.03 and a margin of 0.18 (about half the minimum each).
    """
    m = measure_learning(bco_model_dir, tmp_path)
    print(m)
    assert m["after"] >= 0.9 and m["rise"] > 0.2, m
    assert m["loss_drop"] > 0.03 and m["last_margin"] > 0.18, m
    assert m["logs_delta"] == 1.0, m


def test_shipped_example_runs(bco_model_dir, tmp_path):
    """configs/tiny.yaml with configs/tiny.jsonl, shortened to 2 steps."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    config = load_config(
        BCOConfig,
        configs / "tiny.yaml",
        {
            "model": str(bco_model_dir),
            "dataset": str(configs / "tiny.jsonl"),
            "output_dir": str(tmp_path / "ex"),
            "max_steps": "2",
            "disable_progress_bar": "true",
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(BCO(), config)
    assert result.global_step == 2 and result.final_loss is not None
