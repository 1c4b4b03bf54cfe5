"""The posttrain conformance kit at tier "full" for the reward method."""

from posttrain.testing.kit import conformance_suite

ANSWERS = [
    ("good day", "bad"),
    ("so good", "meh no"),
    ("good", "poor one"),
    ("it is good", "it is not"),
    ("good!", "nah"),
    ("very good indeed", "dull"),
    ("good news", "no news at all"),
    ("all good", "ugh"),
]
ROWS = [
    {"prompt": f"Q{i}: how was it?\nA: ", "chosen": chosen, "rejected": rejected}
    for i in range(2)
    for chosen, rejected in ANSWERS
]  # 16 pairs of different lengths

TestConformance = conformance_suite("reward", rows=ROWS, config={"max_length": 64}, tier="full")
