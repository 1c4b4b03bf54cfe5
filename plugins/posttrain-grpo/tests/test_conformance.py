"""The posttrain conformance kit, tier "full", on a random tiny model.

With ``per_prompt_generation`` rollouts are sampled per prompt under a seed of (seed, step, row), so batching,
accumulation, resuming and re-running do not change them and every invariant holds exactly. Batch sizes count
completions (``batch_unit`` = num_generations): the kit's "batch 4 x 1 == 1 x 4" is 4 prompts either way. The EOS bias in
``generation_kwargs`` makes a random model end completions at varied lengths, so the DAPO loss value
(−Σ A·length / tokens at ratio 1) is not ~0 and the loss comparisons are meaningful. GRPO declares
``supports_images``, so the kit adds its image checks on a tiny LLaVA with prompts that each show one or two shapes.
"""

from posttrain.testing import colour_rows
from posttrain.testing.kit import conformance_suite

ROWS = [{"prompt": f"{a}+{b}=" + " " * (a % 3), "answer": str(a + b)} for a in range(4) for b in range(4)]

TestConformance = conformance_suite(
    "grpo",
    rows=ROWS,
    config={
        "reward_funcs": ["grpo_first_is_digit"],
        "num_generations": 4,
        "per_prompt_generation": True,
        "max_completion_length": 6,
        "learning_rate": 1e-2,
        "generation_kwargs": {"sequence_bias": [[[1], 3.0]]},
        "top_k": 50,  # sample from the 50 likeliest tokens: the learning signal these 8 steps are tuned to
    },  # token 1 = EOS
    tier="full",
    progress_metric="reward",
    progress_direction="increase",
    batch_unit=4,
    # standard prompts ("<image>What colour is the shape? "), so completions are strings like the reward expects
    image_rows=colour_rows(12, "prompt_only", seed=0, conversational=False),
)
