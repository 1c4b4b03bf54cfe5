"""Fixtures for posttrain-trackers: trackers isolated in temporary directories, a tiny model, a toy method and a
helper that trains it for a few steps with some trackers attached."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

# trackio reads TRACKIO_DIR once, when it is imported: point it at a temporary directory before any test does.
_TRACKIO_DIR = tempfile.mkdtemp(prefix="posttrain-trackio-")
os.environ["TRACKIO_DIR"] = _TRACKIO_DIR
atexit.register(shutil.rmtree, _TRACKIO_DIR, True)


@pytest.fixture(autouse=True)
def _isolated_trackers(monkeypatch, tmp_path):
    """No tracker reaches the network or the user's home; their environment variables start unset."""
    for var in list(os.environ):
        if var.startswith(("WANDB_", "MLFLOW_")) or var in (
            "TRACKIO_PROJECT",
            "TRACKIO_SPACE_ID",
            "TRACKIO_SERVER_URL",
        ):
            monkeypatch.delenv(var)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-default.db'}")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("trackers-tiny") / "model")


# -- a toy method: next-token cross-entropy on text rows, enough to drive the loop --------------------------------


TOY_SOURCE = """
from dataclasses import dataclass

import torch
from posttrain import LossOutput
from posttrain.config import TrainingConfig
from posttrain.ops import token_logps


@dataclass
class ToyConfig(TrainingConfig):
    max_length: int = 64  # tokens per row
    nan_at_step: int = -1  # make the loss NaN at this step (a failed run)


class Toy:
    name = "toy"
    config_class = ToyConfig
    dataset_formats = ("language_modeling",)

    def prepare(self, dataset, ctx):
        tok = ctx.tokenizer
        return [{"input_ids": [*tok(r["text"]).input_ids[: ctx.config.max_length - 1], tok.eos_token_id]} for r in dataset]

    def collate(self, rows, ctx):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), ctx.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def loss(self, model, batch, ctx):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        n = (labels >= 0).sum()
        loss_sum = -token_logps(logits[:, :-1], labels).sum()
        if ctx.step == ctx.config.nan_at_step:
            loss_sum = loss_sum * float("nan")
        return LossOutput(loss_sum, n, {"num_tokens": n.float(), "rewards/margins": n.float() / 100})


ROWS = [{"text": ("abc " * (1 + i % 5)) + str(i)} for i in range(16)]
"""


@functools.cache
def _toy():
    """The toy module (Toy, ToyConfig, ROWS), built once; a module other processes can import from a file too."""
    module = types.ModuleType("posttrain_trackers_toy")
    sys.modules[module.__name__] = module  # dataclasses and get_type_hints look the module up
    exec(TOY_SOURCE, module.__dict__)
    return module


class InterruptAt:
    """Sends this process a SIGINT after step ``step`` is logged: the loop finishes the step, saves a checkpoint and
    ends the run as interrupted, exactly as a first Ctrl-C does."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, ctx, metrics):
        if metrics["step"] == self.step:
            signal.raise_signal(signal.SIGINT)


@dataclass
class Trainer:
    model_dir: Path
    tmp: Path

    def config(self, name: str = "run", **fields):
        values = dict(
            model=str(self.model_dir),
            output_dir=str(self.tmp / name),
            max_steps=4,
            learning_rate=1e-3,
            per_device_train_batch_size=4,
            logging_steps=1,
            eval_steps=2,
            save_steps=0,
            disable_progress_bar=True,
            seed=0,
        )
        values.update(fields)
        return _toy().ToyConfig(**values)

    def train(self, config, callbacks=(), expect_error: type[BaseException] | None = None):
        """Train the toy method with ``callbacks``; returns the rows of metrics.jsonl."""
        from posttrain.loop import train

        toy = _toy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the toy is nobody's experimental method
            if expect_error is None:
                train(toy.Toy(), config, train_dataset=toy.ROWS, eval_dataset=toy.ROWS[:8], callbacks=list(callbacks))
            else:
                with pytest.raises(expect_error):
                    train(
                        toy.Toy(), config, train_dataset=toy.ROWS, eval_dataset=toy.ROWS[:8], callbacks=list(callbacks)
                    )
        return metrics_rows(config.output_dir)

    interrupt_at = InterruptAt
    toy_source = TOY_SOURCE

    @staticmethod
    def expected_points(output_dir) -> dict[str, dict[int, float]]:
        """metric name -> {step: value} from metrics.jsonl (nulls skipped): what a tracker must hold."""
        out: dict[str, dict[int, float]] = {}
        for row in metrics_rows(output_dir):
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    out.setdefault(key, {})[row["step"]] = float(value)
        return out


def metrics_rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def trainer(tiny_model_dir, tmp_path):
    return Trainer(tiny_model_dir, tmp_path)
