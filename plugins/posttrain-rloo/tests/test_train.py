"""A tiny model learns with RLOO; the shipped config is valid and trains through the CLI."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import load_config
from posttrain.loop import train
from posttrain_rloo import RLOO, RLOOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_rloo_raises_the_verifier_reward(rloo_echo_model, rloo_echo_rows, tmp_path):
    """The echo model answers `echo D` with the right digit ~15% of the time; 30 RLOO steps (k = 8, the
    KL penalty on) on the exact-answer verifier lift the mean reward clearly."""
    config = RLOOConfig(
        model=str(rloo_echo_model),
        output_dir=str(tmp_path / "run"),
        reward_funcs=["rloo_exact"],
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
    history = train(RLOO(), config, train_dataset=rloo_echo_rows).log_history
    rewards = [row["reward"] for row in history if "reward" in row]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert len(rewards) == 30 and last > first + 0.2, (first, last, rewards)
    assert all(row["kl"] == row["kl"] for row in history)


def test_shipped_config_loads_and_trains_through_the_cli(rloo_tiny_model, tmp_path, monkeypatch):
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train rloo --config plugins/posttrain-rloo/configs/tiny.yaml")
    config = load_config(RLOOConfig, CONFIGS / "tiny.yaml")
    assert config.reward_funcs == ["accuracy"] and config.beta == 0.05
    from posttrain.cli.train import run

    monkeypatch.chdir(CONFIGS.parents[2])
    code = run(
        "train",
        [
            "rloo",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--model",
            str(rloo_tiny_model),
            "--output_dir",
            str(tmp_path / "cli"),
            "--reward_funcs",
            "rloo_first_is_digit",
            "--max_steps",
            "2",
            "--disable_progress_bar",
            "true",
        ],
    )
    assert code == 0 and (tmp_path / "cli" / "model.safetensors").is_file()
