"""Operator commands: check-data, doctor, env, the allow/block lists, inactive packages and provenance.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from posttrain import _discovery as discovery
from posttrain.cli import main

GOOD = "class Method:\n    name = 'ok'\n"


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def ops_toy(fake_site, toy_method_source):
    """The toy LM method as an installed experimental package, ``posttrain-opstoy 0.2.0``."""
    fake_site.add(
        "posttrain-opstoy",
        version="0.2.0",
        status="3 - Alpha",
        methods={"opstoy": "pt_opstoy:Toy"},
        module="pt_opstoy",
        code=toy_method_source,
    )
    return fake_site


def train_args(model, data, out, *extra):
    return [
        "--model",
        model,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--disable_progress_bar",
        *extra,
    ]


# -- check-data ----------------------------------------------------------------------------------------------


PAIRS = [
    {"prompt": "Q1", "chosen": "yes", "rejected": "no"},
    {"prompt": "Q2", "chosen": "yes"},  # 1: rejected missing
    {"prompt": "Q3", "chosen": 3, "rejected": "no"},  # 2: chosen not a string
    {"prompt": "Q4", "chosen": "yes", "rejected": "no"},
    {"prompt": "Q5", "chosen": "", "rejected": "no"},  # 4: chosen empty
    {"prompt": "Q6", "chosen": "yes", "rejected": "no"},
]
MIXED = {"prompt": [{"role": "user", "content": "Q"}], "chosen": "yes", "rejected": "no"}  # DPO's own check


def test_check_data_lists_every_bad_row_with_field_and_fix(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code, out, _ = cli(capsys, "check-data", "dpo", data)
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("row ")]
    assert [line.split()[1] for line in lines] == ["1", "2", "4"]
    assert "row 1 of pairs.jsonl: field 'rejected' is missing. The preference format needs" in lines[0]
    assert "field 'chosen' must be a string" in lines[1] and "Write it as a JSON string" in lines[1]
    assert "field 'chosen' is empty. Remove the row or fill in the field." in lines[2]
    assert "3 bad row(s) out of 6" in out and "'dpo'" in out


def test_check_data_includes_the_methods_own_row_checks(tmp_path, capsys):
    """DPO's ``check_rows`` (an instance method returning messages) adds what the core formats cannot see."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], MIXED, PAIRS[0], MIXED])
    code, out, _ = cli(capsys, "check-data", "dpo", data, "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and [(p["row"], p["field"]) for p in problems] == [(1, "prompt"), (3, "prompt")]
    assert "is a list of messages while 'chosen' is a string" in problems[0]["problem"]


def test_check_data_json_shape_and_limit(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code, out, _ = cli(capsys, "check-data", "dpo", data, "--json")
    report = json.loads(out)
    assert code == 1
    assert set(report) == {"method", "file", "rows", "formats", "bad_rows", "problems", "warnings"}
    assert (report["method"], report["rows"], report["formats"], report["bad_rows"]) == ("dpo", 6, ["preference"], 3)
    assert all(set(p) == {"row", "field", "problem", "fix"} for p in report["problems"])
    assert [(p["row"], p["field"]) for p in report["problems"]] == [
        (1, "rejected"),
        (2, "chosen"),
        (4, "chosen"),
    ]
    code, out, _ = cli(capsys, "check-data", "dpo", data, "--json", "--limit", "2")
    assert code == 1 and [p["row"] for p in json.loads(out)["problems"]] == [1, 2]


def test_check_data_ok_and_malformed_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": f"hello {i}"} for i in range(5)])
    code, out, _ = cli(capsys, "check-data", "sft", data)
    assert code == 0 and out.startswith("ok: 5 rows of") and "'sft'" in out
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    code, out, _ = cli(capsys, "check-data", "sft", tmp_path / "broken.jsonl")
    assert code == 1 and "row 1 of broken.jsonl: line 2 is not valid JSON" in out and "one JSON object" in out


def test_check_data_wrong_format_names_columns(tmp_path, capsys):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello"}] * 3)
    code, out, _ = cli(capsys, "check-data", "dpo", data)
    assert code == 1 and "columns ['text']" in out and "looks like language_modeling" in out


def test_check_data_loads_no_model(tmp_path, capsys, monkeypatch):
    """No model or tokenizer is built: check-data runs even where loading one would fail."""
    import transformers
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("check-data must not load a model or tokenizer")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1] * 4)
    assert cli(capsys, "check-data", "dpo", data)[0] == 0
    assert cli(capsys, "check-data", "dpo", write_jsonl(tmp_path / "bad.jsonl", PAIRS))[0] == 1


# -- doctor --------------------------------------------------------------------------------------------------


def doctor(capsys, monkeypatch, allow, *args):
    monkeypatch.setenv("POSTTRAIN_PLUGINS", allow)  # probe only these packages (the real ones are slow to import)
    return cli(capsys, "doctor", *args)


def test_doctor_healthy_plugin_exits_zero(fake_site, capsys, monkeypatch):
    fake_site.add("pt-fine", methods={"zz-fine": "pt_fine:Method"}, module="pt_fine", code=GOOD)
    code, out, _ = doctor(capsys, monkeypatch, "pt-fine")
    assert code == 0
    assert "ok   method zz-fine" in out and "1 entries checked, 0 with problems" in out


def test_doctor_reports_import_error_with_short_traceback(fake_site, capsys, monkeypatch):
    fake_site.add(
        "pt-crashy",
        methods={"zz-crashy": "pt_crashy:Method"},
        module="pt_crashy",
        code="import json\n\n\ndef helper():\n    raise ImportError('needs the package flux-capacitor')\n\n\nhelper()\n",
    )
    fake_site.add("pt-fine", methods={"zz-fine": "pt_fine:Method"}, module="pt_fine", code=GOOD)
    code, out, _ = doctor(capsys, monkeypatch, "pt-crashy,pt-fine")
    assert code == 1
    assert "FAIL method zz-crashy" in out and "ok   method zz-fine" in out
    assert "import failed:" in out and "pt_crashy.py" in out and "line 5, in helper" in out
    assert "ImportError: needs the package flux-capacitor" in out
    assert out.count("File ") <= 3  # the traceback is cut to its last frames
    assert "2 entries checked, 1 with problems" in out


def test_doctor_notes_module_level_torch_import(fake_site, capsys, monkeypatch):
    fake_site.add("pt-heavy", methods={"zz-heavy": "pt_heavy:Method"}, module="pt_heavy", code="import torch\n" + GOOD)
    code, out, _ = doctor(capsys, monkeypatch, "pt-heavy", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["problems"] == []
    assert row["notes"] == ["imports torch at module level"] and row["import_seconds"] > 0
    assert {"kind", "name", "package", "version", "status", "problems", "notes", "import_seconds"} <= set(row)


def test_doctor_import_timeout(fake_site, capsys, monkeypatch):
    fake_site.add(
        "pt-sleepy", methods={"zz-sleepy": "pt_sleepy:Method"}, module="pt_sleepy", code="import time\ntime.sleep(60)\n"
    )
    code, out, _ = doctor(capsys, monkeypatch, "pt-sleepy", "--timeout", "1")
    assert code == 1 and "import did not finish within 1 s" in out


def test_doctor_flags_incompatible_stable_claim(fake_site, capsys, monkeypatch):
    fake_site.add(
        "pt-stale", requires="posttrain>=9", methods={"zz-stale": "pt_stale:Method"}, module="pt_stale", code=GOOD
    )
    code, out, _ = doctor(capsys, monkeypatch, "pt-stale")
    assert code == 1 and "incompatible: needs posttrain>=9" in out and "claims stable" in out


# -- env -----------------------------------------------------------------------------------------------------


def test_env_json_lists_versions_and_plugins(fake_site, capsys):
    fake_site.add("pt-envy", version="2.3.4", methods={"zz-envy": "pt_envy:Method"}, module="pt_envy", code=GOOD)
    code, out, _ = cli(capsys, "env", "--json")
    env = json.loads(out)
    assert code == 0
    assert {"platform", "python", "posttrain", "libraries", "plugins", "processes", "accelerator"} <= set(env)
    assert env["posttrain"] == discovery.core_version() and env["python"] == sys.version.split()[0]
    assert {"torch", "transformers", "datasets", "accelerate"} <= set(env["libraries"])
    assert "cuda_available" in env["accelerator"]
    assert {
        "name": "zz-envy",
        "kind": "method",
        "package": "pt-envy",
        "version": "2.3.4",
        "status": "stable",
    } in env["plugins"]
    code, text, _ = cli(capsys, "env")
    assert code == 0 and "- posttrain version:" in text and "method zz-envy: pt-envy 2.3.4 (stable)" in text


# -- allow / block lists ---------------------------------------------------------------------------------------


@pytest.fixture
def two_packages(fake_site):
    fake_site.add("pt-alpha", methods={"zz-alpha": "pt_alpha:Method"}, module="pt_alpha", code=GOOD)
    fake_site.add("pt-beta", methods={"zz-beta": "pt_beta:Method"}, module="pt_beta", code=GOOD)
    return fake_site


def listed(capsys):
    assert main(["list", "--json"]) == 0
    return {e["name"] for e in json.loads(capsys.readouterr().out)}


def test_block_and_allow_lists_on_list(two_packages, capsys, monkeypatch):
    assert {"zz-alpha", "zz-beta", "sft"} <= listed(capsys)
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "pt-alpha")  # by distribution name
    assert "zz-alpha" not in listed(capsys) and "zz-beta" in listed(capsys)
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "zz-beta")  # by provided name
    assert "zz-alpha" in listed(capsys) and "zz-beta" not in listed(capsys)
    monkeypatch.delenv("POSTTRAIN_DISABLE_PLUGINS")
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "pt-beta,posttrain-sft")
    assert listed(capsys) == {"zz-beta", "sft"}
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "pt-beta")  # the block list wins over the allow list
    assert listed(capsys) == {"sft"}


def test_block_list_applies_to_training(ops_toy, tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"abc {i}"} for i in range(4)])
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "posttrain-opstoy")
    code, _, err = cli(capsys, "train", "opstoy", *train_args(tiny_model_dir, data, tmp_path / "out"))
    assert code == 2 and "unknown method 'opstoy'" in err and "POSTTRAIN_DISABLE_PLUGINS='posttrain-opstoy'" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("POSTTRAIN_DISABLE_PLUGINS")
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "posttrain-sft")
    code, _, err = cli(capsys, "train", "opstoy", *train_args(tiny_model_dir, data, tmp_path / "out"))
    assert code == 2 and "POSTTRAIN_PLUGINS='posttrain-sft' is set" in err
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "posttrain-opstoy")
    with pytest.warns(FutureWarning, match="experimental"):
        code, _, err = cli(capsys, "train", "opstoy", *train_args(tiny_model_dir, data, tmp_path / "out"))
    assert code == 0, err


# -- inactive (retired) packages -------------------------------------------------------------------------------


@pytest.fixture
def retired_toy(fake_site, toy_method_source):
    fake_site.add(
        "posttrain-oldtoy",
        status="7 - Inactive",
        methods={"oldtoy": "pt_oldtoy:Toy"},
        module="pt_oldtoy",
        code=toy_method_source,
    )
    return fake_site


def test_inactive_hidden_from_list_unless_all(retired_toy, capsys):
    assert "oldtoy" not in listed(capsys)
    assert main(["list", "--all", "--json"]) == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out) if e["name"] == "oldtoy"]
    assert entry["status"] == "inactive"
    assert main(["list", "--status", "inactive"]) == 0 and "oldtoy" in capsys.readouterr().out


def test_inactive_refused_for_training_unless_allowed(retired_toy, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"abc {i}"} for i in range(4)])
    for extra in ([], ["--allow_inactive", "false"]):
        code, _, err = cli(capsys, "train", "oldtoy", *train_args(tiny_model_dir, data, tmp_path / "out", *extra))
        assert code == 2 and "inactive (retired)" in err and "--allow_inactive true" in err
        assert not (tmp_path / "out").exists()
    code, _, err = cli(
        capsys, "train", "oldtoy", *train_args(tiny_model_dir, data, tmp_path / "out"), "--allow_inactive"
    )
    assert code == 0, err
    (tmp_path / "run.yaml").write_text("allow_inactive: true\n")
    args = train_args(tiny_model_dir, data, tmp_path / "out2", "--config", tmp_path / "run.yaml")
    assert cli(capsys, "train", "oldtoy", *args)[0] == 0
    provenance = json.loads((tmp_path / "out2" / "provenance.json").read_text())
    assert provenance["plugins_used"][0]["status"] == "inactive"
    assert cli(capsys, "check-data", "oldtoy", data)[0] == 0  # validating data is always allowed


# -- provenance ------------------------------------------------------------------------------------------------


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_records_plugins_core_environment_and_git(tiny_model_dir, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", "start")
    data = write_jsonl(repo / "prompts.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)])
    git(repo, "add", "prompts.jsonl")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "data")
    head = git(repo, "rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    grpo = ["--reward_funcs", "accuracy", "--num_generations", "2", "--max_completion_length", "2"]
    code, _, err = cli(capsys, "train", "grpo", *train_args(tiny_model_dir, data, repo / "run1", *grpo))
    assert code == 0, err
    record = json.loads((repo / "run1" / "provenance.json").read_text())
    assert record["posttrain"] == discovery.core_version()
    used = {p["name"]: p for p in record["plugins_used"]}
    grpo_entry, accuracy_entry = discovery.find("method", "grpo"), discovery.find("reward", "accuracy")
    assert used["grpo"] == {
        "name": "grpo",
        "kind": "method",
        "package": "posttrain-grpo",
        "version": grpo_entry.version,
        "status": grpo_entry.declared_status,
    }
    assert used["accuracy"]["package"] == "posttrain-rewards" and used["accuracy"]["kind"] == "reward"
    assert used["accuracy"]["version"] == accuracy_entry.version
    assert record["git_commit"] == head  # run1/ is untracked: untracked files do not make it dirty
    env = record["environment"]
    assert env["python"] == sys.version.split()[0] and env["libraries"]["torch"] != "not installed"
    assert "accelerator" in env and any(p["name"] == "grpo" for p in env["plugins"])
    assert isinstance(record["command"], list)  # the command line that started the run
    (repo / "prompts.jsonl").write_text((repo / "prompts.jsonl").read_text() + "\n")  # a tracked file changes
    code, _, err = cli(capsys, "train", "grpo", *train_args(tiny_model_dir, data, repo / "run2", *grpo))
    assert code == 0, err
    assert json.loads((repo / "run2" / "provenance.json").read_text())["git_commit"] == head + "-dirty"


def test_provenance_without_git_repo(ops_toy, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never find a repo above tmp_path
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"abc {i}"} for i in range(4)])
    with pytest.warns(FutureWarning, match="experimental"):
        code, _, err = cli(capsys, "train", "opstoy", *train_args(tiny_model_dir, data, tmp_path / "out"))
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["git_commit"] is None
    assert record["plugins_used"] == [
        {
            "name": "opstoy",
            "kind": "method",
            "package": "posttrain-opstoy",
            "version": "0.2.0",
            "status": "experimental",
        }
    ]
