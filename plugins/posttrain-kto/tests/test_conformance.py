"""The posttrain conformance kit, full tier, on KTO's default loss (loss_type kto)."""

from __future__ import annotations

from posttrain.testing.kit import conformance_suite

ROWS = [
    {"prompt": f"Say {w}:", "completion": f" {w} yes" if i % 2 == 0 else f" {w} no", "label": i % 2 == 0}
    for i, w in enumerate(
        ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe"]
    )
]

# padding_invariance passes: the kit scores the untrained model, where policy == reference, so every reward and
# z0 are 0 whatever the batch; test_train.py checks padding with policy != reference.
TestConformance = conformance_suite(
    "kto",
    rows=ROWS,
    config={"max_length": 64},
    tier="full",
    xfail={
        "grad_accumulation": (
            "loss_type 'kto' subtracts a KL point z0 estimated from the mismatched pairs of each micro-batch "
            "(as TRL does per device batch), so a row's loss depends on which rows share its micro-batch: 4 rows x 1 "
            "and 2 rows x 2 estimate different z0, and batch 1 is rejected because its only 'mismatched' pair is "
            "the row itself. With loss_type apo_zero_unpaired (no z0) the check passes (test_train.py)."
        ),
        "padding_invariance": (
            "the kit compares loss_sum([a, b]) with loss_sum([a]) + loss_sum([b]); with loss_type 'kto' the KL point "
            "z0 comes from the micro-batch, so a row alone and a row beside another see different z0 (0.9937 vs "
            "0.9967 on the kit's rows). Padding itself changes nothing: test_padding_does_not_change_the_kto_loss "
            "pads the same batch wider with policy != reference."
        ),
    },
)
