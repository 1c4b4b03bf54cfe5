"""Training through the Python API behaves as `posttrain train` does: the experimental warning and provenance.json.

Also pins down which ways of silencing ExperimentalWarning work, since Python's `-W` option cannot name it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import posttrain
import pytest
from posttrain import _discovery as discovery
from posttrain import _environment
from posttrain.cli import main

ROWS = [
    {"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {w[::-1]}x"} for w in ["cat", "dog", "sun", "owl"] * 2
]


def orpo_config(model_dir, output_dir):
    from posttrain.config import build_config
    from posttrain_orpo import ORPOConfig

    values = {"model": str(model_dir), "output_dir": str(output_dir), "max_steps": 1, "per_device_train_batch_size": 4}
    return build_config(ORPOConfig, {**values, "disable_progress_bar": True, "save_steps": 0, "max_length": 32})


def test_the_python_api_warns_and_records_provenance_like_the_cli(tiny_model_dir, tmp_path, capsys):
    from posttrain_orpo import ORPO

    entry = discovery.find("method", "orpo")
    assert entry.declared_status == discovery.EXPERIMENTAL, "this test needs an experimental installed method"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        posttrain.train(ORPO(), orpo_config(tiny_model_dir, tmp_path / "api"), train_dataset=ROWS)
    ours = [w for w in caught if issubclass(w.category, posttrain.ExperimentalWarning)]
    assert len(ours) == 1 and "'orpo'" in str(ours[0].message) and entry.package in str(ours[0].message)
    api = json.loads((tmp_path / "api" / "provenance.json").read_text())

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "cli")]
    args += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--save_steps", "0", "--max_length", "32"]
    assert main(["train", "orpo", *args, "--disable_progress_bar", "true"]) == 0, capsys.readouterr().err
    cli = json.loads((tmp_path / "cli" / "provenance.json").read_text())

    assert api["plugins_used"] == cli["plugins_used"] == _environment.provenance(entry, [])["plugins_used"]
    assert set(api) == set(cli) and api["posttrain"] == cli["posttrain"]
    assert (tmp_path / "api" / "posttrain_config.yaml").is_file()


def test_a_method_defined_in_a_script_has_no_plugin_to_record(runner, toy_rows, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.train(toy_rows[:8], "script", max_steps=1)
    assert not [w for w in caught if issubclass(w.category, posttrain.ExperimentalWarning)]
    assert json.loads((tmp_path / "script" / "provenance.json").read_text())["plugins_used"] == []


WARN = "import warnings, posttrain; warnings.warn('experimental!', posttrain.ExperimentalWarning)"


@pytest.mark.parametrize(
    ("options", "code", "silenced"),
    [
        (["-W", "ignore::posttrain.ExperimentalWarning"], WARN, False),  # Python cannot import posttrain for -W
        (["-W", "ignore::FutureWarning"], WARN, True),  # works, and hides every FutureWarning
        (
            [],
            "import warnings, posttrain\n"
            "warnings.filterwarnings('ignore', category=posttrain.ExperimentalWarning)\n" + WARN.split("; ", 1)[1],
            True,
        ),
    ],
    ids=["-W posttrain.ExperimentalWarning", "-W FutureWarning", "warnings.filterwarnings"],
)
def test_which_filters_silence_the_warning(options, code, silenced):
    out = subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert ("experimental!" not in out.stderr) is silenced, out.stderr
    if options[1:] == ["ignore::posttrain.ExperimentalWarning"]:
        assert "Invalid -W option ignored" in out.stderr
