"""A tiny model learns a synthetic preference with DPO, through the real training loop.

The chosen answer repeats the prompt's word and ends in "please"; the rejected one reverses the word
and says "no". At step 0 the policy equals the reference, so every implicit reward is 0 and the reward
accuracy (strict r_w > r_l) is 0. After 16 steps of 8 pairs, held-out pairs (new words) must be
ranked correctly far above chance: accuracy >= 0.9 and a positive margin.
"""

import math
import warnings

from posttrain.config import build_config
from posttrain.loop import train
from posttrain_dpo import DPO, DPOConfig


def _run(dpo_model_dir, dpo_pairs, tmp_path, **fields):
    values = {
        "model": str(dpo_model_dir),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 16,
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": True,
        "max_length": 64,
        "seed": 0,
        **fields,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(
            DPO(),
            build_config(DPOConfig, values),
            train_dataset=dpo_pairs(64, seed=0),
            eval_dataset=dpo_pairs(16, seed=123),
        )


def measure_sigmoid(model_dir, out_dir, pairs, seed: int = 0) -> dict[str, float]:
    """The run of test_reward_accuracy_on_held_out_pairs_rises_far_above_chance (``benchmarks/calibrate_learning.py
    dpo-sigmoid`` runs it over seeds and thread counts); ``pairs`` is the conftest's pair generator."""
    result = _run(model_dir, pairs, out_dir, seed=seed)
    train_rows = [row for row in result.log_history if "loss" in row]
    evaluation = [row for row in result.log_history if "eval_loss" in row][-1]
    return {
        "first_loss": train_rows[0]["loss"],
        "loss_drop": train_rows[0]["loss"] - train_rows[-1]["loss"],
        "eval_accuracy": evaluation["eval_rewards/accuracies"],
        "eval_margin": evaluation["eval_rewards/margins"],
        "eval_loss": evaluation["eval_loss"],
    }


def measure_ipo(model_dir, out_dir, pairs, seed: int = 0) -> dict[str, float]:
    """The run of test_ipo_with_precomputed_reference_learns_too (``calibrate_learning.py dpo-ipo``)."""
    result = _run(model_dir, pairs, out_dir, loss_type=["ipo"], precompute_ref_log_probs=True, max_steps=10, seed=seed)
    evaluation = [row for row in result.log_history if "eval_loss" in row][-1]
    return {"eval_accuracy": evaluation["eval_rewards/accuracies"]}


def test_reward_accuracy_on_held_out_pairs_rises_far_above_chance(dpo_model_dir, dpo_pairs, tmp_path):
    """Every measure is computed from logits (the loop's evaluation scores the 16 held-out pairs; no sampling).

    Calibration (``python benchmarks/calibrate_learning.py dpo-sigmoid --seeds 0-4 --threads 1 2``, 2026-11-30, 10
    runs): the training loss fell by 0.36 at least (mean 0.38); held-out accuracy 1.0 in every run, margin 0.92 at
    least (mean 0.97), loss 0.34 at most (log 2 - 0.36). Thresholds about half of those: a drop of 0.18, accuracy
    0.9 (15 of 16 pairs), margin 0.45, eval loss below log 2 - 0.18. Without training every one stays at its start.
    """
    m = measure_sigmoid(dpo_model_dir, tmp_path, dpo_pairs)
    # step 1: policy == reference, and both forwards are the same computation, so z is exactly 0 and every pair's
    # loss is float32(log 2); the loop sums 8 of them in float32 (<= 7 roundings of ~5.5, 2.3e-6) and divides by 8:
    # within 3e-7 of log 2 (measured 1.9e-9, the rounding of log 2 itself). A reference that is not the policy
    # moves it by far more.
    assert abs(m["first_loss"] - math.log(2)) < 1e-6, m
    assert m["loss_drop"] > 0.18, m
    assert m["eval_accuracy"] >= 0.9, m
    assert m["eval_margin"] > 0.45, m
    assert m["eval_loss"] < math.log(2) - 0.18, m


def test_ipo_with_precomputed_reference_learns_too(dpo_model_dir, dpo_pairs, tmp_path):
    """Held-out accuracy from the loop's evaluation (logits, no sampling). Calibration
    (``python benchmarks/calibrate_learning.py dpo-ipo --seeds 0-4 --threads 1 2``, 2026-11-30, 10 runs): 1.0 in
    every run; threshold 0.9 (15 of 16 pairs), against 0 at step 0 (policy == reference: every margin is 0)."""
    m = measure_ipo(dpo_model_dir, tmp_path, dpo_pairs)
    assert m["eval_accuracy"] >= 0.9, m
