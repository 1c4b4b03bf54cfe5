"""Weights & Biases in offline mode: a tiny run, interrupted and resumed, read back from W&B's own run files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb", reason="wandb is not installed: pip install 'posttrain-trackers[wandb]'")

from posttrain_trackers import trackers_for  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK, HEADER = 32768, 7


def records(path: Path):
    """The records of a ``run-<id>.wandb`` file: a LevelDB-style log (32 KiB blocks of chunks, each with a 7-byte
    header: crc32, length, type full/first/middle/last) holding protobuf ``Record`` messages, after a 7-byte file
    header (``:W&B``, magic 0xBEE1, version)."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # too little room left for a header: the rest of the block is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # full or last: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def read_runs(wandb_dir: Path) -> list[dict]:
    """Per offline run directory (in order): run id, config, history points, summary, exit code, artifacts."""
    runs = []
    for run_file in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        run = {"config": {}, "points": {}, "summary": {}, "exit_code": None, "artifacts": []}
        for record in records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        run["points"].setdefault(key, {})[items["_step"]] = value
            elif kind == "summary":
                run["summary"].update({u.key: json.loads(u.value_json) for u in record.summary.update if u.key})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
            elif kind == "artifact":
                run["artifacts"].append((record.artifact.name, list(record.artifact.aliases)))
        runs.append(run)
    return runs


def test_interrupted_then_resumed_run_is_one_wandb_run_equal_to_metrics_jsonl(trainer):
    options = {"wandb": {"project": "pt-wandb", "tags": ["tiny"], "log_checkpoints": True}}
    config = trainer.config(report_to=["wandb"], tracker_options=options)
    trainer.train(config, [*trackers_for(config), trainer.interrupt_at(2)])
    resumed = trainer.config(report_to=["wandb"], tracker_options=options, resume_from_checkpoint="latest")
    trainer.train(resumed, trackers_for(resumed))

    wandb.teardown()  # the W&B service writes run files asynchronously: stop it, so that they are complete
    first, second = read_runs(trainer.tmp / "run" / "wandb")  # offline: one directory per wandb.init
    assert first["id"] == second["id"]  # the resumed run continued the same W&B run
    points = {k: {**first["points"].get(k, {}), **second["points"].get(k, {})} for k in first["points"]}
    assert points == trainer.expected_points(config.output_dir)

    assert first["config"]["learning_rate"] == 1e-3 and first["config"]["tracker_options"] == options
    assert "learning_rate" not in second["config"]  # the config is logged once per W&B run
    provenance = json.loads((trainer.tmp / "run" / "provenance.json").read_text())
    assert first["config"]["posttrain_provenance"]["plugins_used"] == provenance["plugins_used"]
    assert first["config"]["posttrain_provenance"]["posttrain"] == provenance["posttrain"]

    assert (first["summary"]["posttrain/status"], first["exit_code"]) == ("interrupted", 130)
    assert (second["summary"]["posttrain/status"], second["exit_code"]) == ("finished", 0)
    assert [(name, sorted(aliases)) for name, aliases in first["artifacts"]] == [
        (f"checkpoint-{first['id']}", ["latest", "step-2"])
    ]
    state = json.loads((trainer.tmp / "run" / "trackers.json").read_text())["wandb"]
    assert state["run_id"] == first["id"] and state["project"] == "pt-wandb"
