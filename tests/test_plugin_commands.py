"""Commands that installed packages add through the ``posttrain.commands`` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from posttrain.cli import main

HELLO = """
def hello(argv):
    print("hello", *argv)
    return 3 if "--fail" in argv else 0

def crash(argv):
    raise ValueError("boom")

not_a_function = 42
"""


def test_help_lists_package_commands_without_importing_them(fake_site):
    fake_site.add(
        "acme-tools",
        version="1.2.0",
        commands={"zz-hello": "acme_heavy:hello"},
        module="acme_heavy",
        code="raise RuntimeError('imported!')\n",
        summary="Acme's extra commands",
    )
    code = (
        "import sys\nfrom posttrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', [m for m in ('torch', 'pluggy', 'yaml', 'rich', 'acme_heavy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert "commands from installed packages:" in out.stdout
    line = next(line for line in out.stdout.splitlines() if "zz-hello" in line)
    assert "Acme's extra commands" in line and "[acme-tools 1.2.0]" in line


def test_package_command_runs_with_its_arguments_and_exit_code(fake_site, capsys):
    fake_site.add("acme-tools", commands={"zz-hello": "acme_cmd:hello"}, module="acme_cmd", code=HELLO)
    assert main(["zz-hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert main(["zz-hello", "--fail"]) == 3


def test_command_that_fails_to_import_is_one_line_naming_the_package(fake_site, capsys):
    fake_site.add(
        "acme-broken", commands={"zz-broken": "acme_broken:hello"}, module="acme_broken", code="import nope\n"
    )
    assert main(["zz-broken"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "command 'zz-broken' from acme-broken 1.0.0 failed to import: it raised ModuleNotFoundError" in err
    assert "No module named 'nope' (entry point zz-broken = acme_broken:hello in posttrain.commands)" in err
    assert "posttrain install --force-reinstall acme-broken" in err
    assert "posttrain uninstall acme-broken" in err
    # the rest of the CLI is unaffected
    assert main(["list", "--kind", "command"]) == 0
    assert "zz-broken" in capsys.readouterr().out


def test_command_that_exits_at_import_is_reported_like_any_plugin(fake_site, capsys):
    """sys.exit at import is not the command's exit code: the command never ran, its package is broken."""
    fake_site.add(
        "acme-quit", commands={"zz-quit": "acme_quit:hello"}, module="acme_quit", code="import sys\nsys.exit(4)\n"
    )
    assert main(["zz-quit"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "command 'zz-quit' from acme-quit 1.0.0 failed to import: it called sys.exit(4)" in err
    )


def test_command_whose_module_is_missing_is_listed_broken(fake_site, capsys):
    fake_site.add("acme-hollow", commands={"zz-hollow": "acme_not_there:hello"})
    assert main(["zz-hollow"]) == 2
    assert "broken" in capsys.readouterr().err
    assert main(["list", "--check"]) == 1


def test_command_that_is_not_a_function(fake_site, capsys):
    fake_site.add("acme-tools", commands={"zz-int": "acme_int:not_a_function"}, module="acme_int", code=HELLO)
    assert main(["zz-int"]) == 2
    assert "not a function" in capsys.readouterr().err


def test_command_that_crashes_keeps_its_traceback_and_names_the_package(fake_site, capsys):
    fake_site.add("acme-tools", commands={"zz-crash": "acme_crash:crash"}, module="acme_crash", code=HELLO)
    assert main(["zz-crash"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: boom" in err
    assert "bug in acme-tools" in err


def test_two_packages_with_one_command_name_is_an_error_naming_both(fake_site, capsys):
    fake_site.add("acme-one", commands={"zz-dup": "acme_one:hello"}, module="acme_one", code=HELLO)
    fake_site.add("acme-two", commands={"zz-dup": "acme_two:hello"}, module="acme_two", code=HELLO)
    assert main(["zz-dup"]) == 2
    err = capsys.readouterr().err
    assert "acme-one and acme-two" in err and "'acme-one:zz-dup'" in err
    assert main(["acme-two:zz-dup", "x"]) == 0
    assert capsys.readouterr().out == "hello x\n"


def test_a_package_cannot_replace_a_builtin_command(fake_site, capsys):
    fake_site.add("acme-evil", commands={"list": "acme_evil:hello"}, module="acme_evil", code=HELLO)
    assert main(["list", "--kind", "command", "--json"]) == 0  # the built-in ran
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["package"] == "acme-evil")
    assert row["status"] == "conflict" and "built-in posttrain command" in row["reason"]
    assert main(["list", "--check"]) == 1
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "unavailable (conflict)" in capsys.readouterr().out


def test_list_shows_a_commands_section(fake_site, capsys):
    fake_site.add("acme-tools", commands={"zz-hello": "acme_list:hello"}, module="acme_list", code=HELLO)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Commands:" in out
    assert any(line.startswith("zz-hello") and "acme-tools" in line for line in out.splitlines())


def test_unknown_command_known_to_the_index_says_what_to_install(tmp_path, monkeypatch, capsys):
    index = {"version": 1, "packages": [{"package": "acme-export", "origin": "third-party", "commands": ["zz-export"]}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    monkeypatch.setenv("POSTTRAIN_PLUGIN_INDEX", str(tmp_path / "index.json"))
    assert main(["zz-export"]) == 2
    err = capsys.readouterr().err
    assert "command 'zz-export' is not installed; it is provided by acme-export" in err
    assert "`posttrain install acme-export`" in err
