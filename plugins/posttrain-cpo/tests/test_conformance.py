"""The posttrain conformance kit, full tier, on CPO."""

from __future__ import annotations

from posttrain.testing.kit import conformance_suite

# Chosen and rejected share no structure on purpose: mirrored pairs (the same letters in two cases) make
# chosen and rejected gradients cancel, and the cancellation turns float rounding into visible weight noise.
WORDS = "abc hgfe dada bead cafe fade gbh ebb head deaf face bad egg ace hedge badge".split()
ROWS = [{"prompt": f"say {w}:", "chosen": w, "rejected": WORDS[(i + 5) % 16][::-1] + "x"} for i, w in enumerate(WORDS)]

TestConformance = conformance_suite("cpo", rows=ROWS, config={"max_length": 64}, tier="full")
