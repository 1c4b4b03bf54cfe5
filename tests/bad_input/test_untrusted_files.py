"""Bad input, class "nothing executed from files a user did not write".

A pickle payload (an object whose ``__reduce__`` would create a marker file) is planted in each file of a
checkpoint in turn; resuming must never run it (the marker never appears) and must say so in one line.
The model's own directory is covered in ``test_models.py`` (remote code, pickled ``.bin`` weights).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from bad_input_catalogue import LM, cli, jsonl, snapshot

#: The toy method with every kind of checkpointed state: method state (state_dict) and, with batch_reuse 2
#: and a rollout, a rollout cache that checkpoint-1 (in the middle of a reuse group) holds.
STATEFUL = """

class StatefulToy(Toy):
    name = "statetoy"

    def state_dict(self):
        return {"seen": torch.tensor([1.0]), "note": "plain data"}

    def load_state_dict(self, state):
        self.loaded = state

    def batch_reuse(self, config):
        return 2

    def rollout(self, model, batch, ctx):
        return batch
"""


class Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_torch(path: Path, marker: Path) -> None:
    import torch

    torch.save({"state": Payload(marker)}, path)


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def plant_remote_config(path: Path, marker: Path) -> None:
    """A config.json asking for code from the checkpoint directory (never read on resume)."""
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    path.write_text(json.dumps(config))
    (path.parent / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")


#: file of checkpoint-1 -> how to plant the payload, and what resuming must say (None: resuming succeeds
#: because the file is never read as code).
PLANTS = {
    "optimizer.pt": (plant_torch, "optimizer.pt is not a plain file of tensors and data"),
    "scheduler.pt": (plant_torch, "scheduler.pt is not a plain file of tensors and data"),
    "rng_state_0.pt": (plant_torch, "rng_state_0.pt is not a plain file of tensors and data"),
    "method_state.pt": (plant_torch, "method_state.pt is not a plain file of tensors and data"),
    "rollout_cache_0.pt": (plant_torch, "rollout_cache_0.pt is not a plain file of tensors and data"),
    "optimizer.pt (raw pickle)": (plant_pickle, "optimizer.pt is not a plain file of tensors and data"),
    "model.safetensors": (plant_pickle, "the checkpoint is corrupt or incomplete (model.safetensors"),
    "trainer_state.json": (plant_pickle, "the checkpoint is corrupt or incomplete (trainer_state.json"),
    "config.json": (plant_remote_config, None),
    "tokenizer_config.json": (plant_remote_config, None),
}


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory, tiny_model_dir, toy_module):
    """A fake installed package providing the stateful toy (each test trains its own run)."""
    root = tmp_path_factory.mktemp("stateful")
    site = root / "site"
    site.mkdir()
    source = Path(toy_module.__file__).read_text() + STATEFUL
    (site / "pt_statetoy.py").write_text(source)
    dist = site / "pt_statetoy-1.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pt-statetoy\nVersion: 1.0.0\n"
        "Classifier: Development Status :: 5 - Production/Stable\n"
    )
    (dist / "entry_points.txt").write_text("[posttrain.methods]\nstatetoy = pt_statetoy:StatefulToy\n")
    return root


def args(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "statetoy", "--model", model, "--dataset", root / "lm.jsonl", "--output_dir", out,
            "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--disable_progress_bar", *extra]  # fmt: skip


@pytest.mark.parametrize("planted", sorted(PLANTS))
def test_planted_payload_never_runs(planted, stateful_run, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(stateful_run / "site"))
    import importlib

    importlib.invalidate_caches()
    (tmp_path / "lm.jsonl").write_text(jsonl(LM))
    out = tmp_path / "out"
    first = cli(*args(tmp_path, tiny_model_dir, out))
    assert first.code == 0, first.err
    checkpoint = out / "checkpoint-1"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
        "method_state.pt",
        "rollout_cache_0.pt",
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
    }
    (out / "run_complete.json").unlink()  # an unfinished run, resumable from checkpoint-1
    marker = tmp_path / "PAYLOAD_RAN"
    plant, said = PLANTS[planted]
    plant(checkpoint / planted.split(" ")[0], marker)
    before = snapshot(checkpoint)
    outcome = cli(*args(tmp_path, tiny_model_dir, out, "--resume_from_checkpoint", "latest"))
    assert not marker.exists(), f"the payload planted in {planted} ran"
    assert "Traceback" not in outcome.err
    if said is None:
        assert outcome.code == 0, outcome.err
        return
    assert outcome.code == 2, outcome.err
    first_line = outcome.err.splitlines()[0]
    assert f"cannot resume from {checkpoint}" in first_line and said in first_line, outcome.err
    assert "Delete it and start again" in first_line
    assert snapshot(checkpoint) == before, "the suspicious checkpoint was changed"
