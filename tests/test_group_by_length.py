"""``group_by_length``: rows of similar length share a micro-batch, the order stays random and exact.

Checked on the loop's own order function (``posttrain.loop._step_rows``): determinism per seed, every row of the
epoch exactly once, the same micro-batches for any process count, the longest row first, and the pad tokens
saved on heavy-tailed lengths; then through ``train``: the option changes what is batched, and a resumed run
continues the same order.
"""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
from posttrain._errors import PluginError
from posttrain.loop import _row_lengths, _step_rows
from safetensors.torch import load_file


def heavy_tailed(n: int, seed: int = 0) -> tuple[int, ...]:
    """Log-normal token counts, 16 to 2,048, median ~128: the shape of real SFT data (the bench's real32k)."""
    rng = random.Random(seed)
    return tuple(min(2048, max(16, round(rng.lognormvariate(4.85, 0.9)))) for _ in range(n))


def epoch_batches(lengths, batch, accumulation, world, seed, grouped=True):
    """Every (step, micro-batch, rank) -> rows of the first epoch."""
    n = len(lengths)
    steps = n // (batch * world * accumulation)
    out = {}
    for step in range(steps):
        for rank in range(world):
            micro_rows, epoch = _step_rows(
                step, n, batch, accumulation, world, rank, seed, lengths if grouped else None
            )
            assert epoch == 0
            for k, rows in enumerate(micro_rows):
                out[(step, k, rank)] = rows
    return out


def pad_tokens(batches, lengths) -> int:
    return sum(max(lengths[i] for i in rows) * len(rows) - sum(lengths[i] for i in rows) for rows in batches.values())


def test_order_is_deterministic_per_seed_and_differs_across_seeds_and_epochs():
    lengths = heavy_tailed(400)
    a = epoch_batches(lengths, 4, 2, 1, seed=3)
    assert a == epoch_batches(lengths, 4, 2, 1, seed=3)
    assert a != epoch_batches(lengths, 4, 2, 1, seed=4)
    steps_per_epoch = 400 // 8
    first = _step_rows(0, 400, 4, 2, 1, 0, 3, lengths)[0]
    next_epoch, epoch = _step_rows(steps_per_epoch, 400, 4, 2, 1, 0, 3, lengths)
    assert epoch == 1 and next_epoch != first


@pytest.mark.parametrize("batch, accumulation, world", [(4, 1, 1), (2, 3, 2), (3, 2, 2)])
def test_every_row_of_the_epoch_once_the_same_rows_as_the_plain_order(batch, accumulation, world):
    lengths = heavy_tailed(203)  # not a multiple of the step's rows: the plain order's tail is left out too
    grouped = [i for rows in epoch_batches(lengths, batch, accumulation, world, 0).values() for i in rows]
    plain = [i for rows in epoch_batches(lengths, batch, accumulation, world, 0, grouped=False).values() for i in rows]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(plain)


def test_two_processes_see_the_micro_batches_of_one_process_with_twice_the_batch():
    """Each process takes its share of one global micro-batch, so P x B rows equal 1 x (P*B), as without grouping."""
    lengths = heavy_tailed(300)
    one = epoch_batches(lengths, 4, 2, 1, seed=1)
    two = epoch_batches(lengths, 2, 2, 2, seed=1)
    for (step, k, _), rows in one.items():
        assert two[(step, k, 0)] + two[(step, k, 1)] == rows
    # each process's share is itself length-grouped: process 0 has the longer half of the sorted micro-batch
    assert all(min(lengths[i] for i in two[(s, k, 0)]) >= max(lengths[i] for i in two[(s, k, 1)]) for s, k, _ in one)


def test_the_longest_row_is_in_the_first_micro_batch():
    lengths = heavy_tailed(500, seed=7)
    first = _step_rows(0, 500, 4, 2, 1, 0, 11, lengths)[0][0]
    assert max(lengths) in {lengths[i] for i in first}


def test_padding_saved_on_heavy_tailed_lengths_and_the_order_stays_random():
    """Pad tokens of one epoch at batch 8: padded to the longest row of each micro-batch.

    On these lengths the plain random order pads ~1.8x the real tokens (a tail row in a batch pads its seven
    neighbours); grouped by length pads 0.045-0.064x as many as the plain order over seeds 0-4, so the bound
    0.1x leaves room for any seed and still fails if grouping is lost.
    """
    lengths = heavy_tailed(2000)
    grouped = epoch_batches(lengths, 8, 1, 1, seed=0)
    plain = epoch_batches(lengths, 8, 1, 1, seed=0, grouped=False)
    assert pad_tokens(plain, lengths) > sum(lengths)  # the workload really wastes tokens without grouping
    assert pad_tokens(grouped, lengths) < 0.1 * pad_tokens(plain, lengths)
    # the steps' lengths are not sorted: long and short micro-batches alternate at random
    widths = [max(lengths[i] for i in grouped[(s, 0, 0)]) for s in range(len(grouped))]
    rises = sum(b > a for a, b in itertools.pairwise(widths))
    assert 0.3 < rises / (len(widths) - 1) < 0.7


def test_row_lengths_are_the_rows_padded_width():
    rows = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},  # SFT: input_ids
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},  # pairwise: prompt + longest
        {"chosen_ids": [1, 2], "rejected_ids": [3, 4, 5, 6]},  # reward: the longer sequence
        {"prompt_ids": [1, 2, 3, 4]},  # online methods: the prompt
    ]
    assert _row_lengths(object(), rows) == (3, 5, 4, 4)


def test_rows_without_token_lists_are_named():
    class Method:
        name = "opaque"

    with pytest.raises(PluginError, match=r"'opaque'.*row 1 has no input_ids.*\['pixels'\]"):
        _row_lengths(Method(), [{"input_ids": [1]}, {"pixels": [0.5]}])


def final_weights(path):
    return load_file(str(path / "model.safetensors"))


def varied_rows(n: int = 48) -> list[dict]:
    rng = random.Random(0)
    return [{"text": "ab " * min(20, max(1, round(rng.lognormvariate(1.2, 0.8)))) + str(i)} for i in range(n)]


def recorded_collate(toy_module, monkeypatch):
    """Record the width and real-token count of every train micro-batch the toy method collates."""
    seen = []
    original = toy_module.Toy.collate

    def collate(self, rows, ctx):
        batch = original(self, rows, ctx)
        if ctx.training:
            seen.append((batch["attention_mask"].numel(), int(batch["attention_mask"].sum())))
        return batch

    monkeypatch.setattr(toy_module.Toy, "collate", collate)
    return seen


def test_train_batches_rows_by_length(runner, toy_module, monkeypatch):
    rows = varied_rows()
    seen = recorded_collate(toy_module, monkeypatch)
    runner.train(rows, "plain", max_steps=6)
    plain = [total - real for total, real in seen]
    seen.clear()
    runner.train(rows, "grouped", max_steps=6, group_by_length=True)
    grouped = [total - real for total, real in seen]
    assert sum(grouped) < 0.5 * sum(plain), (grouped, plain)


def test_resume_with_group_by_length_equals_uninterrupted(runner):
    rows = varied_rows()
    full = runner.train(rows, "g-full", max_steps=6, save_steps=3, group_by_length=True)
    shutil.copytree(runner.tmp / "g-full" / "checkpoint-3", runner.tmp / "g-part" / "checkpoint-3")
    resumed = runner.train(
        rows, "g-part", max_steps=6, save_steps=3, group_by_length=True, resume_from_checkpoint="latest"
    )
    assert [r["loss"] for r in resumed.log_history] == [r["loss"] for r in full.log_history][3:]
    a, b = final_weights(runner.tmp / "g-full"), final_weights(runner.tmp / "g-part")
    assert all((a[k] == b[k]).all() for k in a)
