"""The Method protocol: what a method plugin gives the shared loop.

A method is any class with these attributes; it does not inherit from anything in core. The loop
instantiates it with no arguments, then calls, in order::

    method.setup(ctx)                         # optional: reference model, precomputation
    rows = method.prepare(dataset, ctx)       # validate + tokenize, once, before training
    batch = method.collate(rows, ctx)         # per micro-batch
    batch = method.rollout(model, batch, ctx) # optional, online methods: generate + score
    out = method.loss(model, batch, ctx)      # -> LossOutput

**The normalisation contract.** ``loss`` returns the *sum* of its per-item losses and the number of
items it is normalised by (tokens for a token-level loss, pairs for a pairwise loss). The loop
back-propagates the sums of every micro-batch of an optimizer step on every process, then divides
the gradient by the total item count of the whole step. A method therefore never divides by
``gradient_accumulation_steps`` or the world size, and batch 8 x accumulation 1 equals batch 1 x
accumulation 8 by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class LossOutput:
    """What :meth:`Method.loss` returns for one micro-batch.

    Attributes:
        loss_sum: scalar tensor, the sum of the per-item losses of this micro-batch (with grad).
        n_items: how many items ``loss_sum`` sums over (int or 0-dim tensor); the loop divides by
            the total over the optimizer step, all micro-batches and processes included.
        metrics: name -> float or 0-dim tensor, averaged over micro-batches and processes before
            logging (use TRL's names: ``rewards/margins``, ``logps/chosen``, ...).
    """

    loss_sum: Any
    n_items: Any
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainContext:
    """Everything a method may need from the run, passed to every protocol call.

    ``model`` is the unwrapped policy model (use it for ``generate``); inside ``loss`` call the
    ``model`` argument, which may be wrapped for distributed training.
    """

    config: Any
    tokenizer: Any = None
    accelerator: Any = None
    model: Any = None
    model_path: str | None = None
    step: int = 0  # optimizer steps completed so far
    micro_step: int = 0  # index of the micro-batch inside the current step
    training: bool = True  # False during evaluation
    rewards: dict[str, Any] = field(default_factory=dict)  # resolved reward functions by name
    state: dict[str, Any] = field(default_factory=dict)  # free space for a method's own objects

    @property
    def device(self):
        if self.accelerator is not None:
            return self.accelerator.device
        import torch

        return torch.device("cpu")

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0


@runtime_checkable
class Method(Protocol):
    """A training method. See the module docstring for the call order and the loss contract.

    Optional members the loop uses when present: ``setup(ctx)``, ``rollout(model, batch, ctx)``,
    ``check_rows(dataset) -> list[str]`` (problems for ``posttrain check-data``),
    ``state_dict()`` / ``load_state_dict(state)`` (method state saved in checkpoints, e.g. a
    running mean), ``load_model(config)`` (a model class other than a causal LM).

    Example::

        class MyMethod:
            name = "my-method"
            config_class = MyConfig
            dataset_formats = ("language_modeling",)
            def prepare(self, dataset, ctx): ...
            def collate(self, rows, ctx): ...
            def loss(self, model, batch, ctx): return LossOutput(loss_sum, n_items, {})
    """

    name: str
    config_class: type
    dataset_formats: tuple[str, ...]

    def prepare(self, dataset: Any, ctx: TrainContext) -> Any: ...

    def collate(self, rows: list[dict], ctx: TrainContext) -> dict: ...

    def loss(self, model: Any, batch: dict, ctx: TrainContext) -> LossOutput: ...
