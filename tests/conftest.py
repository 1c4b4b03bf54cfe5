"""Shared fixtures for core's tests: fake plugin distributions, a tiny model, a toy method."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import threading
import types
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """No leaked warning state, operator lists or plugin manager between tests."""
    from posttrain import _discovery as discovery
    from posttrain import _registry as registry

    for var in (
        "POSTTRAIN_EXPERIMENTAL_SILENCE",
        "POSTTRAIN_PLUGINS",
        "POSTTRAIN_DISABLE_PLUGINS",
        "POSTTRAIN_STRICT_PLUGINS",
    ):
        monkeypatch.delenv(var, raising=False)
    discovery._warned.clear()
    registry.reset_plugin_manager()
    yield
    registry.reset_plugin_manager()


class FakeSite:
    """Writes ``.dist-info`` directories (and their modules) into a directory put on sys.path."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        name: str,
        version: str = "1.0.0",
        *,
        status: str | None = "5 - Production/Stable",
        requires: str | None = "posttrain>=1.0,<2",
        methods: dict[str, str] | None = None,
        rewards: dict[str, str] | None = None,
        plugins: dict[str, str] | None = None,
        environments: dict[str, str] | None = None,
        commands: dict[str, str] | None = None,
        summary: str | None = None,
        module: str | None = None,
        code: str | None = None,
    ) -> Path:
        dist = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        lines = [
            "Metadata-Version: 2.1",
            f"Name: {name}",
            f"Version: {version}",
            f"Summary: {summary if summary is not None else name + ' test plugin'}",
        ]
        if status:
            lines.append(f"Classifier: Development Status :: {status}")
        if requires:
            lines.append(f"Requires-Dist: {requires}")
        (dist / "METADATA").write_text("\n".join(lines) + "\n")
        eps = []
        for group, items in (
            ("posttrain.methods", methods),
            ("posttrain.rewards", rewards),
            ("posttrain.plugins", plugins),
            ("posttrain.environments", environments),
            ("posttrain.commands", commands),
        ):
            if items:
                eps.append(f"[{group}]")
                eps += [f"{k} = {v}" for k, v in items.items()]
        (dist / "entry_points.txt").write_text("\n".join(eps) + "\n")
        if module:
            (self.root / f"{module}.py").write_text(textwrap.dedent(code or ""))
        importlib.invalidate_caches()
        return dist


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    site = FakeSite(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site.root))
    monkeypatch.setenv("PYTHONPATH", str(site.root) + ":" + ":".join(sys.path))
    yield site
    for name in list(sys.modules):
        module = sys.modules[name]
        if getattr(module, "__file__", None) and str(site.root) in str(module.__file__):
            del sys.modules[name]


@pytest.fixture
def one_torch_thread():
    """In-process runs with one torch thread, as in the ``OMP_NUM_THREADS=1`` subprocesses they are compared with
    bit for bit: another thread count may split a kernel's reductions differently, and round differently."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from posttrain.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# -- a toy method: next-token cross-entropy, enough to exercise the loop ---------------------------------

TOY_METHOD_SOURCE = """
from dataclasses import dataclass

import torch

from posttrain.config import TrainingConfig
from posttrain.data import check
from posttrain._method import LossOutput
from posttrain.ops import token_logps


@dataclass
class ToyConfig(TrainingConfig):
    max_length: int = 64  # tokens per row
    nan_at_step: int = -1  # test hook: make the loss NaN at this step
    hang_at_step: int = -1  # test hook: process 1 hangs in the loss at this step
    die_at_step: int = -1  # test hook: process 1 dies in the loss at this step (die_by: exit = os._exit(1), raise)
    die_by: str = "exit"
    empty_at_step: int = -1  # test hook: no loss items at this step (every process), as when all are truncated


class Toy:
    name = "toy"
    config_class = ToyConfig
    dataset_formats = ("language_modeling",)

    def prepare(self, dataset, ctx):
        check(dataset, self.dataset_formats)
        tok = ctx.tokenizer
        return [{"input_ids": tok(row["text"]).input_ids[: ctx.config.max_length - 1] + [tok.eos_token_id]}
                for row in dataset]

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
        logps = token_logps(logits[:, :-1], labels)
        n = (labels >= 0).sum()
        loss_sum = -logps.sum()
        if ctx.step == ctx.config.nan_at_step:
            loss_sum = loss_sum * float("nan")
        if ctx.step == ctx.config.empty_at_step:
            loss_sum, n = loss_sum * 0, n * 0
        if ctx.step == ctx.config.hang_at_step and ctx.accelerator.process_index == 1:
            import signal
            signal.pause()  # hangs until a signal (the launcher's SIGTERM once another process has failed)
        if ctx.step == ctx.config.die_at_step and ctx.accelerator.process_index == 1:
            if ctx.config.die_by == "raise":
                raise RuntimeError("planted failure in the loss")
            import os
            os._exit(1)  # no exception, no cleanup: as a process killed by the OOM killer or a segfault
        return LossOutput(loss_sum, n, {"num_tokens": n.float()})
"""


@pytest.fixture(scope="session")
def toy_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "posttrain_toy_method.py").write_text(TOY_METHOD_SOURCE)
    sys.path.insert(0, str(root))
    module = importlib.import_module("posttrain_toy_method")
    yield module
    sys.path.remove(str(root))


@pytest.fixture
def toy_rows():
    # different lengths, so padding and normalisation are really exercised
    return [{"text": ("abc " * (1 + i % 7)) + str(i)} for i in range(32)]


@dataclass
class Runner:
    module: object
    model_dir: Path
    tmp: Path

    def config(self, name: str, **kw):
        base = dict(
            model=str(self.model_dir),
            output_dir=str(self.tmp / name),
            max_steps=4,
            learning_rate=1e-3,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_steps=0,
            disable_progress_bar=True,
            seed=0,
        )
        base.update(kw)
        return self.module.ToyConfig(**base)

    def train(self, rows, name: str = "run", **kw):
        from posttrain.loop import train

        config = self.config(name, **kw)
        return train(self.module.Toy(), config, train_dataset=rows)


@pytest.fixture
def runner(toy_module, tiny_model_dir, tmp_path):
    return Runner(toy_module, tiny_model_dir, tmp_path)


@pytest.fixture
def toy_method_source():
    return TOY_METHOD_SOURCE


# -- a stand-in for vLLM 0.33's public API ------------------------------------------------------------------
# A stand-in for the parts of vLLM 0.33's public API that posttrain's vLLM backends call.
#
# It mirrors the trainer-side weight-transfer API (``vllm.distributed.weight_transfer``:
# ``WeightTransferTrainerFactory.trainer_init(init_info, client=, source=)`` returning an engine whose
# ``send_weights()`` drives ``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` through the
# client while it streams ``source.iter_full()``), ``WeightSource`` / ``ParamMeta``, the IPC and NCCL init
# infos, and ``HTTPVLLMWeightSyncClient``. ``deliver`` receives the streamed tensors (a test decides where
# they land). The real library is exercised on a GPU machine.


@pytest.fixture
def vllm_stand_in(monkeypatch):
    """``install(deliver, record)``: puts the stand-in vLLM weight-transfer modules in sys.modules."""
    return lambda deliver, record: _install_vllm_stand_in(monkeypatch, deliver, record)


def _install_vllm_stand_in(monkeypatch, deliver, record: dict) -> None:
    @dataclass(frozen=True)
    class ParamMeta:
        name: str
        dtype: object
        shape: tuple

    class WeightSource:
        pass

    class Engine:
        def __init__(self, init_info, client, source):
            self.init_info, self.client, self.source = init_info, client, source

        def send_weights(self):
            record["sends"] = record.get("sends", 0) + 1
            names = [m.name for m in self.source.metadata]
            if not self.init_info.rank == 0:
                list(self.source.iter_full())  # non-senders still iterate (collectives)
                return
            self.client.start_weight_update()
            info = {"names": names, "dtype_names": [str(m.dtype).split(".")[-1] for m in self.source.metadata]}
            receiver = threading.Thread(target=self.client.update_weights, args=(info,))
            receiver.start()  # vLLM's workers block in their receive while the trainer broadcasts
            deliver({name: tensor.detach().clone() for name, tensor in self.source.iter_full()})
            receiver.join()
            self.client.finish_weight_update()

        def shutdown(self):
            record["shutdowns"] = record.get("shutdowns", 0) + 1

    class WeightTransferTrainerFactory:
        @staticmethod
        def trainer_init(init_info, *, client, source=None):
            record.setdefault("inits", []).append(init_info)
            if init_info.rank == 0:
                client.init_weight_transfer_engine({"backend": init_info.backend})
            return Engine(init_info, client, source)

    class HTTPVLLMWeightSyncClient:
        def __init__(self, base_url, timeout=300):
            self.base_url = base_url.rstrip("/")

        def _post(self, path, body=None):
            request = urllib.request.Request(
                f"{self.base_url}/{path}",
                data=json.dumps(body or {}).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=300).read()

        def init_weight_transfer_engine(self, init_info):
            self._post("init_weight_transfer_engine", {"init_info": init_info})

        def start_weight_update(self):
            self._post("start_weight_update")

        def update_weights(self, update_info):
            self._post("update_weights", {"update_info": update_info})

        def finish_weight_update(self, weight_version=None):
            self._post("finish_weight_update")

    @dataclass
    class IPCTrainerInitInfo:
        backend: ClassVar[str] = "ipc"
        rank: int = field(kw_only=True)

    @dataclass
    class NCCLTrainerInitInfo:
        backend: ClassVar[str] = "nccl"
        master_address: str
        master_port: int
        world_size: int
        rank: int = field(kw_only=True)

    wt = types.ModuleType("vllm.distributed.weight_transfer")
    wt.ParamMeta, wt.WeightSource = ParamMeta, WeightSource
    wt.WeightTransferTrainerFactory, wt.HTTPVLLMWeightSyncClient = (
        WeightTransferTrainerFactory,
        HTTPVLLMWeightSyncClient,
    )
    ipc = types.ModuleType("vllm.distributed.weight_transfer.ipc_engine")
    ipc.IPCTrainerInitInfo = IPCTrainerInitInfo
    nccl = types.ModuleType("vllm.distributed.weight_transfer.nccl_engine")
    nccl.NCCLTrainerInitInfo = NCCLTrainerInitInfo
    if sys.modules.get("vllm") is None:  # a test may have put its own stand-in engine module there
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer", wt)
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.ipc_engine", ipc)
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.nccl_engine", nccl)
