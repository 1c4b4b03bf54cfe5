"""The posttrain conformance kit, full tier, run against the installed `bco` entry point."""

from posttrain.testing.kit import conformance_suite

WORDS = ["cat", "dog", "sun", "sky", "map", "cup", "pen", "box"]

# 16 unpaired rows: a desirable and an undesirable completion per prompt, of different lengths (for padding).
ROWS = [
    {"prompt": f"Say {w}{'!' * (i % 3)}: ", "completion": w * (1 + i % 2), "label": True} for i, w in enumerate(WORDS)
] + [
    {"prompt": f"Say {w}{'!' * (i % 3)}: ", "completion": w[::-1] + "?" * (i % 4), "label": False}
    for i, w in enumerate(WORDS)
]

TestConformance = conformance_suite(
    "bco",
    rows=ROWS,
    config={"max_length": 64},
    tier="full",
    xfail={
        "grad_accumulation": (
            "the reward shift delta is a running mean updated with every micro-batch before its loss (as TRL's "
            "BCO trainer did), so with accumulation the micro-batches of one step see different deltas, while "
            "batch 4 x 1 sees one delta; step 1 agrees (policy == reference, every reward 0) but "
            "step 2 differs by ~8e-4 relative"
        ),
    },
)
