"""A tiny model learns with GRPO; the shipped config trains through the CLI; KL and mu > 1 runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from posttrain.config import load_config
from posttrain.loop import train
from posttrain_grpo import GRPO, GRPOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_grpo_raises_the_verifier_reward(grpo_echo_model, grpo_echo_rows, tmp_path):
    """The echo model answers `echo D` with the right digit ~15% of the time (half its training targets
    were random); 30 GRPO steps on the exact-answer verifier lift the mean reward clearly."""
    config = GRPOConfig(
        model=str(grpo_echo_model),
        output_dir=str(tmp_path / "run"),
        reward_funcs=["grpo_exact"],
        max_steps=30,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=4,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
    )
    history = train(GRPO(), config, train_dataset=grpo_echo_rows).log_history
    rewards = [row["reward"] for row in history if "reward" in row]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert len(rewards) == 30 and last > first + 0.2, (first, last, rewards)


def test_shipped_config_loads_and_trains_through_the_cli(grpo_tiny_model, tmp_path, monkeypatch):
    """configs/tiny.yaml is valid; its command runs (with the test reward instead of `accuracy`)."""
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train grpo --config plugins/posttrain-grpo/configs/tiny.yaml")
    config = load_config(GRPOConfig, CONFIGS / "tiny.yaml")
    assert config.reward_funcs == ["accuracy"] and config.num_generations == 4
    from posttrain.cli.train import run

    monkeypatch.chdir(CONFIGS.parents[2])
    code = run(
        "train",
        [
            "grpo",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--model",
            str(grpo_tiny_model),
            "--output_dir",
            str(tmp_path / "cli"),
            "--reward_funcs",
            "grpo_first_is_digit",
            "--max_steps",
            "2",
            "--disable_progress_bar",
            "true",
        ],
    )
    assert code == 0 and (tmp_path / "cli" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "fields",
    [
        {"beta": 0.05, "loss_type": "grpo"},
        {"num_iterations": 2, "loss_type": "dr_grpo", "gradient_accumulation_steps": 2},
    ],
)
def test_kl_and_multi_iteration_runs(grpo_tiny_model, grpo_echo_rows, tmp_path, fields):
    config = GRPOConfig(
        model=str(grpo_tiny_model),
        output_dir=str(tmp_path / "run"),
        reward_funcs=["grpo_first_is_digit"],
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=4,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
        eval_dataset=None,
        **fields,
    )
    history = train(GRPO(), config, train_dataset=grpo_echo_rows, eval_dataset=grpo_echo_rows[:4]).log_history
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    eval_row = history[-1]
    assert "eval_reward" in eval_row and "eval_loss" in eval_row
    if fields.get("beta"):
        assert all("kl" in row for row in history if "loss" in row) and history[-2]["kl"] > 0
    if fields.get("num_iterations"):  # steps 1 and 3 train on the rollouts of steps 0 and 2 again
        rewards = [row["reward"] for row in history if "loss" in row]
        assert rewards[0] == rewards[1] and rewards[2] == rewards[3]
