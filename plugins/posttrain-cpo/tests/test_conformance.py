"""The posttrain conformance kit, full tier, on CPO."""

from __future__ import annotations

from posttrain.testing.kit import conformance_suite

# Chosen and rejected share no structure on purpose: mirrored pairs (the same letters in two cases) make
# chosen and rejected gradients cancel, and the cancellation turns float rounding into visible weight noise.
WORDS = "abc hgfe dada bead cafe fade gbh ebb head deaf face bad egg ace hedge badge".split()
ROWS = [{"prompt": f"say {w}:", "chosen": w, "rejected": WORDS[(i + 5) % 16][::-1] + "x"} for i, w in enumerate(WORDS)]

TestConformance = conformance_suite("cpo", rows=ROWS, config={"max_length": 64}, tier="full")


def test_the_padding_free_auto_check_catches_a_method_that_ignores_the_per_batch_choice(tmp_path):
    """Two wrong readings of setup's "auto" (resolved for a per-micro-batch choice under sdpa) fail the kit's check,
    each with a message that says what the forwards got: "auto" taken as always packed, and as never packed."""
    import pytest
    from posttrain.testing.kit import check_padding_free_auto, tiny_model
    from posttrain_cpo.method import CPO

    class AutoAlwaysPacks(CPO):
        def setup(self, ctx):
            super().setup(ctx)
            self.padding_free = bool(self.padding_free)  # a truthy "auto" read as true

    class AutoNeverPacks(CPO):
        def setup(self, ctx):
            super().setup(ctx)
            self.padding_free = self.padding_free is True  # "auto" read as false

    model_dir = tiny_model(tmp_path / "tiny")
    check_padding_free_auto(CPO, ROWS, model_dir, {"max_length": 64})
    with pytest.raises(AssertionError, match="padding estimated cheaper .* batches of \\[1"):
        check_padding_free_auto(AutoAlwaysPacks, ROWS, model_dir, {"max_length": 64})
    with pytest.raises(AssertionError, match="packing estimated cheaper .* batches of \\[[2-9]"):
        check_padding_free_auto(AutoNeverPacks, ROWS, model_dir, {"max_length": 64})
