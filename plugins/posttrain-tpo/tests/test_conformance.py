"""The posttrain conformance kit, full tier, run against the installed `tpo` entry point."""

from posttrain.testing.kit import conformance_suite

WORDS = ["cat", "dog", "sun", "sky", "map", "cup", "pen", "box", "hat", "owl", "fig", "jam", "kit", "log", "net", "rug"]

# 16 triples of different lengths (for padding); the gold reference is the word itself.
ROWS = [
    {
        "prompt": f"Say {w}{'!' * (i % 3)}: ",
        "chosen": w * (1 + i % 2),
        "rejected": w[::-1] + "?" * (i % 4),
        "reference": w + "." * (i % 2),
    }
    for i, w in enumerate(WORDS)
]

TestConformance = conformance_suite("tpo", rows=ROWS, config={"max_length": 64}, tier="full")
