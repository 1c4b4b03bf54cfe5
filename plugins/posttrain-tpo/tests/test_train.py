"""A tiny model learns a synthetic triple-preference task with TPO, and the shipped example config runs."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from posttrain.config import build_config, load_config
from posttrain.loop import train
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain_tpo import TPO, TPOConfig
from posttrain_tpo.data import collate_rows, tokenize_triple

VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxz"


def vowel_triples(n: int, seed: int) -> list[dict]:
    """chosen and the gold reference are 4 random vowels, rejected 4 random consonants."""
    rng = random.Random(seed)
    return [
        {
            "prompt": "Word: " + "".join(rng.choices(VOWELS + CONSONANTS, k=3)) + "\nReply: ",
            "chosen": "".join(rng.choices(VOWELS, k=4)),
            "rejected": "".join(rng.choices(CONSONANTS, k=4)),
            "reference": "".join(rng.choices(VOWELS, k=4)),
        }
        for _ in range(n)
    ]


@torch.no_grad()
def preference_accuracy(model_dir: str | Path, triples: list[dict]) -> float:
    """Fraction of triples where the policy gives chosen a higher log-prob than rejected (equal lengths)."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), TPOConfig()).eval()
    batch = collate_rows(
        [tokenize_triple(tokenizer, t) for t in triples], tokenizer.pad_token_id, include_reference=False
    )
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    logps = (torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    chosen, rejected = logps[: len(triples)], logps[len(triples) :]
    return (chosen > rejected).float().mean().item()


def measure_learning(model_dir, out_dir, loss_type: str, tpo_alpha: float, seed: int = 0) -> dict[str, float]:
    """The run of test_tiny_model_learns_to_prefer_chosen (``benchmarks/calibrate_learning.py tpo-sigmoid tpo-l``
    runs it over seeds and thread counts)."""
    held_out = vowel_triples(64, seed=1)
    before = preference_accuracy(model_dir, held_out)
    config = build_config(
        TPOConfig,
        {
            "model": str(model_dir),
            "output_dir": str(out_dir / "run"),
            "max_length": 64,
            "learning_rate": 2e-3,
            "loss_type": loss_type,
            "tpo_alpha": tpo_alpha,
            "beta": 0.01 if loss_type == "sigmoid" else 1.0,
            "per_device_train_batch_size": 8,
            "max_steps": 15,
            "logging_steps": 5,
            "save_steps": 0,
            "disable_progress_bar": True,
            "seed": seed,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(TPO(), config, train_dataset=vowel_triples(64, seed=0))
    after = preference_accuracy(out_dir / "run", held_out)
    losses = [row["loss"] for row in result.log_history if "loss" in row]
    return {"before": before, "after": after, "rise": after - before, "loss_drop": losses[0] - losses[-1]}


@pytest.mark.parametrize(("loss_type", "tpo_alpha"), [("sigmoid", 1.0), ("tpo-l", 0.0)])
def test_tiny_model_learns_to_prefer_chosen(tpo_model_dir, tmp_path, loss_type, tpo_alpha):
    """The default objective, and TPO-L with the NLL term off (so the preference term alone must do it). Preference
    accuracy on 64 held-out triples, computed from the logits (no sampling).

    Calibration (``python benchmarks/calibrate_learning.py tpo-sigmoid tpo-l --seeds 0-4 --threads 1 2``,
    2026-11-30, 10 runs each): accuracy 0.25-0.61 before and 1.0 after in every run of both, a rise of 0.39 at least
    (mean 0.53); the loss (steps 11-15 against 1-5) fell by 0.61 (sigmoid) and 0.28 (tpo-l) at least. Thresholds:
    0.9 after, a rise of 0.2, loss drops of 0.3 and 0.14 (about half the minimum each).
    """
    m = measure_learning(tpo_model_dir, tmp_path, loss_type, tpo_alpha)
    print(loss_type, m)
    assert m["after"] >= 0.9 and m["rise"] > 0.2, m
    assert m["loss_drop"] > {"sigmoid": 0.3, "tpo-l": 0.14}[loss_type], m


def test_shipped_example_runs(tpo_model_dir, tmp_path):
    """configs/tiny.yaml with configs/tiny.jsonl, shortened to 2 steps."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    config = load_config(
        TPOConfig,
        configs / "tiny.yaml",
        {
            "model": str(tpo_model_dir),
            "dataset": str(configs / "tiny.jsonl"),
            "output_dir": str(tmp_path / "ex"),
            "max_steps": "2",
            "disable_progress_bar": "true",
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(TPO(), config)
    assert result.global_step == 2 and result.final_loss is not None
