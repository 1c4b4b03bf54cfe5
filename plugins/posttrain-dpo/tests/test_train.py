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


def test_reward_accuracy_on_held_out_pairs_rises_far_above_chance(dpo_model_dir, dpo_pairs, tmp_path):
    result = _run(dpo_model_dir, dpo_pairs, tmp_path)
    train_rows = [row for row in result.log_history if "loss" in row]
    evaluation = [row for row in result.log_history if "eval_loss" in row][-1]
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-5  # step 1: policy == reference
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.1
    assert evaluation["eval_rewards/accuracies"] >= 0.9, evaluation
    assert evaluation["eval_rewards/margins"] > 0.1, evaluation
    assert evaluation["eval_loss"] < math.log(2) - 0.1, evaluation


def test_ipo_with_precomputed_reference_learns_too(dpo_model_dir, dpo_pairs, tmp_path):
    result = _run(dpo_model_dir, dpo_pairs, tmp_path, loss_type=["ipo"], precompute_ref_log_probs=True, max_steps=10)
    evaluation = [row for row in result.log_history if "eval_loss" in row][-1]
    assert evaluation["eval_rewards/accuracies"] >= 0.9, evaluation
