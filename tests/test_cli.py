"""The ``posttrain`` command line: list, info, train, help and version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from posttrain.cli import main

GOOD = "class Method:\n    pass\n"


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_list_does_not_import_torch_or_plugins(fake_site):
    fake_site.add(
        "pt-heavy", methods={"zz-heavy": "pt_heavy:Method"}, module="pt_heavy", code="raise RuntimeError('imported!')\n"
    )
    code = (
        "import sys; from posttrain.cli import main; main(['list']); "
        "bad = [m for m in ('torch', 'transformers', 'pluggy', 'yaml', 'rich', 'pt_heavy') if m in sys.modules]; "
        "print('IMPORTED', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert "zz-heavy" in out.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom posttrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "TORCH False" in out.stdout
    assert "list" in out.stdout and "train" in out.stdout


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("posttrain ")


def test_list_table_shows_status_and_reasons(fake_site, capsys, monkeypatch):
    # the last column shrinks to the terminal: wide enough that the installed packages' names do not cut the reason
    monkeypatch.setenv("COLUMNS", "200")
    fake_site.add("pt-s", methods={"zz-s": "pt_s:Method"}, module="pt_s", code=GOOD, summary="stable thing")
    fake_site.add("pt-e", status="3 - Alpha", methods={"zz-e": "pt_e:Method"}, module="pt_e", code=GOOD)
    fake_site.add("pt-x", methods={"zz-x": "pt_missing:Method"})
    fake_site.add("pt-i", requires="posttrain>=5", methods={"zz-i": "pt_i:Method"}, module="pt_i", code=GOOD)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("zz-")}
    assert "stable" in lines["zz-s"] and "stable thing" in lines["zz-s"]
    assert "experimental" in lines["zz-e"]
    assert "broken" in lines["zz-x"] and "pt_missing" in lines["zz-x"]
    assert "incompatible" in lines["zz-i"] and " no " in lines["zz-i"]


def test_list_status_filter_and_json(fake_site, capsys):
    fake_site.add("pt-s", methods={"zz-s": "pt_s:Method"}, module="pt_s", code=GOOD)
    fake_site.add("pt-e", status="3 - Alpha", methods={"zz-e": "pt_e:Method"}, module="pt_e", code=GOOD)
    assert main(["list", "--status", "experimental", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["status"] for d in data} == {"experimental"}
    assert "zz-e" in {d["name"] for d in data} and "zz-s" not in {d["name"] for d in data}
    assert {"name", "package", "version", "status", "summary", "requires_core", "reason"} <= set(data[0])


def test_list_check_exits_nonzero_on_problems(fake_site, capsys):
    fake_site.add("pt-one", methods={"zz-dup": "pt_one:Method"}, module="pt_one", code=GOOD)
    fake_site.add("pt-two", methods={"zz-dup": "pt_two:Method"}, module="pt_two", code=GOOD)
    assert main(["list", "--check"]) == 1
    captured = capsys.readouterr()
    assert "conflict" in captured.out and "pt-one and pt-two" in captured.err


def test_list_hides_inactive_unless_all(fake_site, capsys):
    fake_site.add("pt-old", status="7 - Inactive", methods={"zz-old": "pt_old:Method"}, module="pt_old", code=GOOD)
    main(["list"])
    assert "zz-old" not in capsys.readouterr().out
    main(["list", "--all"])
    assert "zz-old" in capsys.readouterr().out


@pytest.fixture
def toy_dist(fake_site, toy_method_source):
    fake_site.add(
        "posttrain-toy",
        version="0.3.0",
        status="3 - Alpha",
        methods={"toy": "pt_toy_cli:Toy"},
        module="pt_toy_cli",
        code=toy_method_source,
        summary="Toy next-token method",
    )
    return fake_site


def test_info_shows_package_and_fields(toy_dist, capsys):
    assert main(["info", "toy"]) == 0
    out = capsys.readouterr().out
    assert "posttrain-toy 0.3.0" in out and "experimental" in out
    assert "max_length" in out and "tokens per row" in out and "learning_rate" in out


def test_info_unknown_method_is_one_line_error(toy_dist, capsys):
    assert main(["info", "tyo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Did you mean" in err and "'toy'" in err


def test_train_from_cli_and_yaml(toy_dist, tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"abc {i} " * (1 + i % 3)}) + "\n" for i in range(16)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nlearning_rate: 1e-3\nmax_steps: 3\nlogging_steps: 1\n")
    out = run_cli(
        "train",
        "toy",
        "--config",
        str(config),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--per_device_train_batch_size",
        "4",
        "--disable_progress_bar",
    )
    assert out.returncode == 0, out.stderr
    assert "ExperimentalWarning" in out.stderr and "toy" in out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "learning_rate", "grad_norm", "num_tokens"} <= set(rows[0])
    import yaml

    saved = yaml.safe_load((tmp_path / "out" / "posttrain_config.yaml").read_text())
    assert saved["method"] == "toy" and saved["learning_rate"] == 1e-3 and saved["max_steps"] == 3
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["plugins_used"][0] == {
        "name": "toy",
        "kind": "method",
        "package": "posttrain-toy",
        "version": "0.3.0",
        "status": "experimental",
    }
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_train_unknown_key_suggests(toy_dist, tmp_path):
    out = run_cli("train", "toy", "--model", "x", "--learning_rat", "1e-3")
    assert out.returncode == 2
    assert "unknown key 'learning_rat'" in out.stderr and "did you mean 'learning_rate'" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_help_lists_fields(toy_dist, capsys):
    assert main(["train", "toy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max_length" in out and "--per_device_train_batch_size" in out


def test_train_unknown_method(capsys):
    assert main(["train", "definitely-not-a-method"]) == 2
    assert "unknown method 'definitely-not-a-method'" in capsys.readouterr().err


def test_plot_renders_png(runner, toy_rows, capsys):
    pytest.importorskip("matplotlib")
    runner.train(toy_rows, "plotted", max_steps=3)
    assert main(["plot", str(runner.tmp / "plotted")]) == 0
    png = runner.tmp / "plotted" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(runner.tmp)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["list"], ["--help"], ["info", "dpo"]])
def test_a_closed_pipe_ends_quietly(argv):
    """`posttrain list | head -1`: the reader goes away; no BrokenPipeError traceback, exit 141 (SIGPIPE)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ
    )
    proc.stdout.close()  # before the command writes anything: every write hits a pipe without a reader
    err = proc.stderr.read().decode()
    # 141 (SIGPIPE's shell code); argparse's --help swallows the write error itself and exits 0
    assert proc.wait(timeout=120) == (0 if argv == ["--help"] else 141), err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


def test_a_closed_pipe_in_a_shell_pipeline():
    out = subprocess.run(
        f"{sys.executable} -m posttrain list --all | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() and "Traceback" not in out.stderr and "Broken" not in out.stderr
