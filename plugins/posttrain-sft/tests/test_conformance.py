"""The posttrain conformance kit, full tier, run against the installed `sft` entry point."""

from posttrain.testing.kit import conformance_suite

FACTS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
]

# 16 conversational prompt-completion rows of different lengths (so padding is exercised); the loss is taken on the
# completions only, SFT's default for this dataset type.
ROWS = [
    {
        "prompt": [{"role": "user", "content": f"{'Tell me the ' * (i % 3)}capital of {country}?"}],
        "completion": [{"role": "assistant", "content": city + "." * (i % 2)}],
    }
    for i, (country, city) in enumerate(FACTS * 2)
]

TestConformance = conformance_suite("sft", rows=ROWS, config={"max_length": 64}, tier="full")
