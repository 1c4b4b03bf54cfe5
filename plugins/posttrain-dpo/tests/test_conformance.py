"""The core conformance kit, tier "full": metadata, protocol, config round-trip, row-level errors, and on
a tiny model: loss decreases, batch x accumulation equivalence, padding invariance, resume, determinism."""

from posttrain.testing.kit import conformance_suite

WORDS = [
    "apple",
    "brick",
    "cloud",
    "delta",
    "ember",
    "fjord",
    "grape",
    "haze",
    "iris",
    "jolt",
    "kite",
    "lemon",
    "mango",
    "nexus",
    "orbit",
    "pearl",
]
ROWS = [{"prompt": f"Repeat {w}:", "chosen": f" {w} please", "rejected": f" {w[::-1]} no"} for w in WORDS[:12]]
# implicit prompts (the prompt is the common prefix of chosen and rejected) and longer rows for padding
ROWS += [{"chosen": f"Say {w} twice: {w} {w}", "rejected": f"Say {w} twice: {w}"} for w in WORDS[12:]]

TestConformance = conformance_suite("dpo", rows=ROWS, config={"max_length": 64}, tier="full")
