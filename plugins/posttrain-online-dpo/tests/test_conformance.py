"""The posttrain conformance kit, tier "full", on a random tiny model.

With ``per_prompt_generation`` each prompt's two samples are drawn under a seed of (seed, step, row), so batching,
accumulation, resuming and re-running do not change them and every invariant holds exactly. Batch sizes count
prompts (one pair each), so ``batch_unit`` is 1. The EOS bias in ``generation_kwargs`` makes a random model end
completions at varied lengths, so pairs differ in length and padding has something to disturb.

"Learning" is the mean reward rising (``odpo_short``: shorter completions win). The loss is not the measure: each
step ranks fresh samples, so it stays near log 2 while the policy moves (a fixed pair's loss falls, test_train.py).
With 16 prompts per step the mean reward over 8 steps rises from about -3.1 to -1.7 on this model.
"""

from posttrain.testing.kit import conformance_suite

ROWS = [{"prompt": f"{a}+{b}=" + " " * (a % 3), "answer": str(a + b)} for a in range(4) for b in range(4)]

TestConformance = conformance_suite(
    "online-dpo",
    rows=ROWS,
    config={
        "reward_funcs": ["odpo_short"],
        "per_device_train_batch_size": 16,  # the learning check only: the other checks set their own batch sizes
        "per_prompt_generation": True,
        "max_completion_length": 6,
        "learning_rate": 3e-2,
        "generation_kwargs": {"sequence_bias": [[[1], 3.0]]},  # token 1 = EOS
        "top_k": 50,
    },
    tier="full",
    progress_metric="reward",
    progress_direction="increase",
    batch_unit=1,
)
