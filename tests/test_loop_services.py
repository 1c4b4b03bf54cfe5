"""The loop's look-ahead (``ctx.upcoming_batches``) and its core services (``ctx.services``), on the toy method."""

from __future__ import annotations

import pytest
import torch


class Recorder:
    """A RunService that records what the loop tells it, and what upcoming_batches promised for each step."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.events: list[tuple] = []
        self.promised: dict[int, list] = {}

    def on_step(self, ctx):
        self.events.append(("on_step", ctx.step))
        for upcoming in ctx.upcoming_batches(self.horizon):
            assert all(b["input_ids"].device.type == "cpu" for b in upcoming.batches)
            self.promised.setdefault(upcoming.step, [b["input_ids"].tolist() for b in upcoming.batches])

    def state_dict(self):
        return {"on_steps": sum(1 for e in self.events if e[0] == "on_step"), "name": "recorder"}

    def load_state_dict(self, state):
        self.events.append(("load", state))

    def close(self):
        self.events.append(("close",))


@pytest.fixture
def reusing(toy_module):
    """The toy method with a pass-through rollout, batch_reuse 2 and a Recorder registered in setup."""

    class Reusing(toy_module.Toy):
        def __init__(self):
            self.rolled: dict[int, list] = {}

        def setup(self, ctx):
            self.service = Recorder(horizon=3)
            ctx.services["recorder"] = self.service

        def batch_reuse(self, config):
            return 2

        def rollout(self, model, batches, ctx):
            self.rolled[ctx.step] = [b["input_ids"].tolist() for b in batches]
            return batches

    return Reusing


def test_upcoming_batches_are_exactly_what_the_steps_roll_out(runner, toy_rows, reusing):
    """With batch_reuse 2 and accumulation 2, every step that rolls out (0, 2, 4) receives the very micro-batches
    upcoming_batches announced for it beforehand, and no reusing step is announced."""
    from posttrain.loop import train

    method = reusing()
    train(method, runner.config("ahead", max_steps=6, gradient_accumulation_steps=2), train_dataset=toy_rows)
    assert sorted(method.rolled) == [0, 2, 4]
    assert method.service.promised == method.rolled
    assert [e for e in method.service.events if e[0] == "on_step"] == [("on_step", s) for s in range(7)]
    assert method.service.events[-1] == ("close",)


def test_services_are_checkpointed_restored_and_closed(runner, toy_rows, reusing):
    """A service's state_dict lands in service_state_<rank>.pt (weights_only-loadable), comes back through
    load_state_dict before the resumed run's first on_step, and close() runs when a run fails too."""
    from posttrain.loop import train

    first = reusing()
    train(first, runner.config("svc", max_steps=3, save_steps=2), train_dataset=toy_rows)
    saved = torch.load(runner.tmp / "svc" / "checkpoint-2" / "service_state_0.pt", weights_only=True)
    assert saved == {"recorder": {"on_steps": 3, "name": "recorder"}}
    resumed = reusing()
    config = runner.config(
        "svc",
        max_steps=4,
        resume_override=["max_steps"],
        resume_from_checkpoint=str(runner.tmp / "svc" / "checkpoint-2"),
    )
    with pytest.warns(UserWarning, match="as resume_override asks: max_steps: 3 -> 4"):
        train(resumed, config, train_dataset=toy_rows)
    assert resumed.service.events[:2] == [("load", saved["recorder"]), ("on_step", 2)]

    failing = reusing()
    failing.loss = lambda model, batch, ctx: 1 / 0
    with pytest.raises(ZeroDivisionError):
        train(failing, runner.config("svc-fail", max_steps=2), train_dataset=toy_rows)
    assert failing.service.events[-1] == ("close",)


def test_upcoming_batches_needs_the_loop():
    from posttrain import TrainContext

    with pytest.raises(RuntimeError, match="only available inside posttrain.loop.train"):
        TrainContext(config=None).upcoming_batches(1)
