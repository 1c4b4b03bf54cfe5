"""``posttrain demo``: the quick demo end to end in a subprocess (its output directory, and that SFT beats
the untrained model and GRPO does not fall below SFT on the held-out set), plus its refusals: a missing
plugin, a non-empty output directory, an absent CUDA device, and no matplotlib.

Run alone: ``pytest tests/test_demo.py -q``. The quick demo takes about half a minute of CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from posttrain.cli import demo, demo_task, main

needs_plugins = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("posttrain_sft", "posttrain_grpo", "posttrain_rewards")),
    reason="the demo needs posttrain-sft, posttrain-grpo and posttrain-rewards installed (nox -s tests installs them)",
)


@pytest.mark.slow
@needs_plugins
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("POSTTRAIN_PLUGINS", "POSTTRAIN_DISABLE_PLUGINS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "demo", "--quick", "--output_dir", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for stage in ("sft", "grpo"):
        run_dir = out / stage
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("step" in r for r in rows)
        assert (run_dir / "posttrain_config.yaml").read_text().startswith(f"method: {stage}\n")
        assert (run_dir / "model.safetensors").is_file() and (run_dir / "provenance.json").is_file()
        assert list(run_dir.glob("checkpoint-*")), f"{stage} wrote no checkpoint"
    assert any("reward" in json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines())
    for name in ("sft.jsonl", "grpo.jsonl", "held_out.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "skipping the plot" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["accuracy"]
    print(f"held-out accuracy {accuracy}; {summary['wall_seconds']} s")
    assert set(accuracy) == {"untrained", "sft", "grpo"} and summary["held_out_problems"] == demo_task.N_HELD_OUT
    assert accuracy["sft"] > accuracy["untrained"]
    assert accuracy["grpo"] >= accuracy["sft"]
    assert "after GRPO" in proc.stdout and "done in" in proc.stdout


@needs_plugins
def test_missing_plugin_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "posttrain-grpo")
    code = main(["demo", "--quick", "--output_dir", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2
    assert "posttrain-grpo" in err and "`posttrain install grpo`" in err
    assert not (tmp_path / "demo").exists()  # refused before writing anything


def test_non_empty_output_dir_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--output_dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_removes_only_what_a_demo_wrote(tmp_path):
    for name in ("sft", "grpo", "data"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    demo.check_output_dir(tmp_path, overwrite=True)
    demo.clear_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@needs_plugins
def test_cuda_asked_for_without_a_device(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["demo", "--device", "cuda", "--output_dir", str(tmp_path / "demo")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    for stage, row in (("sft", {"step": 10, "loss": 1.5}), ("grpo", {"step": 5, "loss": 0.0, "reward": 0.5})):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    demo.plot_demo(tmp_path, 10, [{"demo_step": 0, "accuracy": 0.0}])
    assert "skipping the plot" in capsys.readouterr().out and not (tmp_path / "demo.png").exists()


def test_task_split_and_partial_credit():
    train, held_out = demo_task.problems()
    assert len(train) == 700 and len(held_out) == demo_task.N_HELD_OUT and not set(train) & set(held_out)
    assert demo_task.problems() == (train, held_out)  # fixed: independent of --seed
    assert demo_task.digit_match(
        [], ["55", "45", "155", "", [{"role": "assistant", "content": "7"}]], ["55", "55", "55", "55", "7"]
    ) == [1.0, 0.5, 2 / 3, 0.0, 1.0]
