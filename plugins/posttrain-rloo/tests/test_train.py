"""A tiny model learns with RLOO; the shipped config is valid and trains through the CLI."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import load_config
from posttrain.loop import train
from posttrain_rloo import RLOO, RLOOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_rloo_raises_the_verifier_reward(rloo_echo_model, tmp_path):
    """40 RLOO steps on the exact-answer verifier raise the probability that the policy samples the right answer.

    The measure is ``echo_exact_probability`` (computed from the logits, no sampling noise), not the logged
    per-step reward, which is a mean over 64 samples and swings by +-0.2 between steps. Calibration
    (``python benchmarks/calibrate_learning.py rloo --seeds 0-9 --threads 1 2``, 2026-11-30): the rise over
    10 seeds x 1 and 2 threads was +0.14 at least and +0.29 on average (thread count does not change it
    on the tiny model; a different seed moves the trajectory about as much as another CPU does). The margin
    0.07 is half that minimum; a run that does not learn moves it by 0.0 (lr 0) or at random by < 0.03.
    """
    from posttrain.testing import echo_exact, echo_exact_probability, echo_rows

    config = RLOOConfig(
        model=str(rloo_echo_model),
        output_dir=str(tmp_path / "run"),
        reward_funcs=["echo_exact"],
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=64,  # completions: 8 prompts x 8
        num_generations=8,
        max_completion_length=4,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
    )
    history = train(RLOO(), config, train_dataset=echo_rows(), rewards={"echo_exact": echo_exact}).log_history
    before, after = echo_exact_probability(rloo_echo_model), echo_exact_probability(tmp_path / "run")
    print(f"P(exact answer) {before:.3f} -> {after:.3f}")
    assert len([row for row in history if "reward" in row]) == 40
    assert after > before + 0.07, (before, after)
    assert all(row["kl"] == row["kl"] for row in history)


def test_shipped_config_loads_and_trains_through_the_cli(rloo_tiny_model, tmp_path, monkeypatch):
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train rloo --config plugins/posttrain-rloo/configs/tiny.yaml")
    config = load_config(RLOOConfig, CONFIGS / "tiny.yaml")
    assert config.reward_funcs == ["accuracy"] and config.beta == 0.05
    from posttrain.cli.train import run

    # The command runs from the repository root, where plugins/posttrain-rloo/... resolves; a link makes that
    # true from an unpacked sdist too.
    (tmp_path / "root" / "plugins").mkdir(parents=True)
    (tmp_path / "root" / "plugins" / "posttrain-rloo").symlink_to(CONFIGS.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "root")
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
