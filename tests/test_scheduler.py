"""The loop's learning-rate schedules equal transformers' ``get_scheduler`` exactly (the loop writes them out so the
first step does not wait for ``transformers.optimization``, which imports the Trainer's utilities and PEFT)."""

from __future__ import annotations

import pytest
import torch
from posttrain.loop import _scheduler


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 10), (0, 1), (4, 7)])
def test_schedules_equal_transformers(kind, warmup, total):
    from transformers import get_scheduler

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    ours = _scheduler(optimizer(), kind, warmup, total)
    theirs = get_scheduler(kind, optimizer(), num_warmup_steps=warmup, num_training_steps=total)
    assert lrs(ours, total + 2) == lrs(theirs, total + 2)  # exactly: the same float operations


def test_a_scheduler_state_saved_by_transformers_loads():
    """Checkpoints written before (transformers' LambdaLR) resume with the loop's own schedule."""
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    theirs = get_scheduler("linear", torch.optim.SGD([param], lr=0.5), num_warmup_steps=2, num_training_steps=10)
    lrs(theirs, 4)
    ours = _scheduler(torch.optim.SGD([param], lr=0.5), "linear", 2, 10)
    ours.load_state_dict(theirs.state_dict())
    assert lrs(ours, 6) == lrs(theirs, 6)
