"""Marked copies between plugins (`# Copied from ...`) still match their source; the checker works for third parties."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from posttrain.testing.copies import check_copies


def test_marked_copies_have_not_drifted(capsys):
    spec = importlib.util.spec_from_file_location("check_copies", Path(__file__).with_name("check_copies.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "copy markers checked, 0 problem(s)" in out
    assert not out.startswith("0 copy markers"), "the repository has copies; finding none means the scan broke"


SOURCE = """
def pad_pairs(rows, pad_id):
    width = max(len(r) for r in rows)
    return [r + [pad_id] * (width - len(r)) for r in rows]
"""


def third_party(tmp_path: Path, body: str) -> Path:
    src = tmp_path / "mine" / "src" / "posttrain_mine"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "data.py").write_text(f"# Copied from posttrain_dpo_like.data.pad_pairs with pad_id->pad_token_id\n{body}")
    return tmp_path / "mine" / "src"


def installed_source(tmp_path: Path, monkeypatch) -> None:
    """posttrain_dpo_like, installed: on sys.path, never imported by the checker."""
    site = tmp_path / "site"
    (site / "posttrain_dpo_like").mkdir(parents=True)
    (site / "posttrain_dpo_like" / "__init__.py").write_text("raise RuntimeError('the checker must not import me')\n")
    (site / "posttrain_dpo_like" / "data.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(site))


def test_a_third_party_copy_is_checked_against_the_installed_source(tmp_path, monkeypatch):
    installed_source(tmp_path, monkeypatch)
    faithful = SOURCE.replace("pad_id", "pad_token_id")
    assert check_copies([third_party(tmp_path / "a", faithful)]) == (1, [])
    checked, problems = check_copies([third_party(tmp_path / "b", faithful.replace("max(", "min("))])
    assert checked == 1 and "has drifted" in problems[0] and "+    width = min(" in problems[0]


def test_a_missing_source_is_named(tmp_path):
    checked, problems = check_copies([third_party(tmp_path, SOURCE)])
    assert checked == 1 and "cannot find the source posttrain_dpo_like.data.pad_pairs" in problems[0]


def test_the_command_line(tmp_path, monkeypatch):
    installed_source(tmp_path, monkeypatch)
    src = third_party(tmp_path, SOURCE.replace("pad_id", "pad_token_id").replace("max(", "min("))
    out = subprocess.run(
        [sys.executable, "-m", "posttrain.testing.copies", str(src)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 1 and "1 copy markers checked, 1 problem(s)" in out.stdout
