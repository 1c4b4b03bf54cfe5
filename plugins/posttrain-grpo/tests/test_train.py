"""A tiny model learns with GRPO; the shipped config trains through the CLI; KL and mu > 1 runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from posttrain.config import load_config
from posttrain.loop import train
from posttrain_grpo import GRPO, GRPOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_grpo_raises_the_verifier_reward(grpo_echo_model, tmp_path):
    """40 GRPO steps on the exact-answer verifier raise the probability that the policy samples the right answer.

    The measure is ``echo_exact_probability`` (computed from the logits, no sampling noise), not the logged
    per-step reward, which is a mean over 64 samples and swings by +-0.2 between steps. Calibration
    (``python benchmarks/calibrate_learning.py grpo --seeds 0-9 --threads 1 2``, 2026-11-30): the rise over
    10 seeds x 1 and 2 threads was +0.135 at least and +0.30 on average (thread count does not change it
    on the tiny model; a different seed moves the trajectory about as much as another CPU does). The margin
    0.07 is half that minimum; a run that does not learn moves it by 0.0 (lr 0) or at random by < 0.03.
    """
    from posttrain.testing import echo_exact, echo_exact_probability, echo_rows

    config = GRPOConfig(
        model=str(grpo_echo_model),
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
    history = train(GRPO(), config, train_dataset=echo_rows(), rewards={"echo_exact": echo_exact}).log_history
    before, after = echo_exact_probability(grpo_echo_model), echo_exact_probability(tmp_path / "run")
    print(f"P(exact answer) {before:.3f} -> {after:.3f}")
    assert len([row for row in history if "reward" in row]) == 40
    assert after > before + 0.07, (before, after)


def test_shipped_config_loads_and_trains_through_the_cli(grpo_tiny_model, tmp_path, monkeypatch):
    """configs/tiny.yaml is valid; its command runs (with the test reward instead of `accuracy`)."""
    first = (CONFIGS / "tiny.yaml").read_text().splitlines()[0]
    assert first.startswith("# posttrain train grpo --config plugins/posttrain-grpo/configs/tiny.yaml")
    config = load_config(GRPOConfig, CONFIGS / "tiny.yaml")
    assert config.reward_funcs == ["accuracy"] and config.num_generations == 4
    from posttrain.cli.train import run

    # The command runs from the repository root, where plugins/posttrain-grpo/... resolves; a link makes that
    # true from an unpacked sdist too.
    (tmp_path / "root" / "plugins").mkdir(parents=True)
    (tmp_path / "root" / "plugins" / "posttrain-grpo").symlink_to(CONFIGS.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "root")
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
        per_device_train_batch_size=8,  # completions: 2 prompts x 4
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


def test_num_iterations_uses_every_prompt_once_per_epoch(grpo_tiny_model, tmp_path):
    """mu = 2 over 8 prompts, 2 per step: 4 data steps x 2 optimizer steps each. Every prompt is rolled out
    exactly once (TRL's repeat sampler), none is dropped, and each rollout is trained on twice."""
    seen = []

    def record(prompts, completions, **columns):
        seen.extend(prompts[:: len(prompts) // 2])  # one entry per prompt of the micro-batch
        return [float(c[:1].isdigit()) for c in completions]

    rows = [{"prompt": f"q{i}="} for i in range(8)]
    config = GRPOConfig(
        model=str(grpo_tiny_model),
        output_dir=str(tmp_path / "run"),
        num_iterations=2,
        num_train_epochs=1,
        per_device_train_batch_size=8,  # 2 prompts x 4 completions
        num_generations=4,
        max_completion_length=3,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
    )
    result = train(GRPO(), config, train_dataset=rows, rewards={"record": record})
    assert result.global_step == 8 and sorted(seen) == sorted(r["prompt"] for r in rows)
