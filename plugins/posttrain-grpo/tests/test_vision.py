"""GRPO learns on rows with images: a tiny LLaVA that names colours, sampled with the image in its prompt, raises
an exact-match reward on held-out images."""

from __future__ import annotations

import pytest
from posttrain.loop import train
from posttrain.testing import build_colour_vlm, colour_exact, colour_exact_probability, colour_rows
from posttrain_grpo import GRPO, GRPOConfig

MARGIN, ABOVE_CHANCE = 0.1, 0.1  # provisional: set from the calibration below
HELD_OUT = colour_rows(40, "preference", seed=1000)  # conversational prompts, 40 images the run never sees


@pytest.fixture(scope="module")
def colour_vlm(tmp_path_factory):
    """The policy after a short SFT stage (60 steps, the right colour as target 3 times in 4): it answers with a
    colour name and ``<|end|>`` most of the time and reads the image a little, so an exact-match reward is not
    always zero and a group of 8 completions usually holds right and wrong answers."""
    return build_colour_vlm(tmp_path_factory.mktemp("grpo-vlm"), seed=0, sft_steps=60, right_fraction=0.75)


def test_grpo_raises_the_exact_match_reward_on_held_out_images(colour_vlm, tmp_path):
    """40 GRPO steps (8 prompts x 8 completions, sampled with the prompt's images) raise the expected exact-match
    reward on 40 held-out images: p(right colour then ``<|end|>``) at temperature 1, computed from the logits
    (``colour_exact_probability``, no sampling noise).

    A policy that does not read the image can reach 0.25 at most (one colour in four, always well formed), so
    ending above 0.25 says the rise comes from the image and not from the answer format alone.

    Calibration (``python benchmarks/calibrate_vision.py grpo --seeds 0-4 --threads 1 2``, 2026-11-30; seed = the
    model's initialisation, the SFT stage, the training rows and the sampling): CALIBRATION
    """
    config = GRPOConfig(
        model=str(colour_vlm),
        output_dir=str(tmp_path / "run"),
        reward_funcs=["colour_exact"],
        max_steps=40,
        learning_rate=2e-3,
        per_device_train_batch_size=64,  # completions: 8 prompts x 8
        num_generations=8,
        max_completion_length=8,
        logging_steps=10,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
    )
    train(GRPO(), config, train_dataset=colour_rows(64, "prompt_only", seed=0), rewards={"colour_exact": colour_exact})
    before = colour_exact_probability(colour_vlm, HELD_OUT)
    after = colour_exact_probability(config.output_dir, HELD_OUT)
    print(f"held-out P(exact answer) {before:.3f} -> {after:.3f}")
    assert after > before + MARGIN, (before, after)
    assert after > 0.25 + ABOVE_CHANCE, (before, after)
