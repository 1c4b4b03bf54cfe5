"""The posttrain conformance kit, tier "full", on a random tiny model.

Rollouts are sampled per prompt under a seed of (seed, step, row), so batching, accumulation, resuming
and re-running do not change them. The EOS bias in ``generation_kwargs`` makes a random model end
completions at varied lengths.
"""

from posttrain.testing.kit import check_grad_accumulation, conformance_suite
from posttrain_rloo import RLOO

ROWS = [{"prompt": f"{a}+{b}=" + " " * (a % 3), "answer": str(a + b)} for a in range(4) for b in range(4)]
CONFIG = {
    "reward_funcs": ["rloo_first_is_digit"],
    "num_generations": 4,
    "per_prompt_generation": True,
    "max_completion_length": 6,
    "learning_rate": 1e-2,
    "generation_kwargs": {"sequence_bias": [[[1], 3.0]]},
    "top_k": 50,  # sample from the 50 likeliest tokens: the learning signal these 8 steps are tuned to
}  # token 1 = EOS

TestConformance = conformance_suite(
    "rloo",
    rows=ROWS,
    config=CONFIG,
    tier="full",
    progress_metric="reward",
    progress_direction="increase",
    batch_unit=4,
)


def test_grad_accumulation_gives_the_same_weights(tmp_path):
    """RLOO's loss at ratio 1 is −Σ_i A_i / N and leave-one-out advantages sum to 0 in every group, so the
    logged loss is float noise (the kit compares it with an absolute floor); the weights are what matter:
    batch 4 x 1, 1 x 4 and 2 x 2 reach the same weights after 2 steps (atol 1e-5)."""
    from posttrain.testing.kit import tiny_model

    check_grad_accumulation(
        RLOO, ROWS, tiny_model(tmp_path / "model"), tmp_path, CONFIG, rtol=float("inf"), batch_unit=4
    )
