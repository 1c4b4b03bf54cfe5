"""Marked copies between plugins (`# Copied from ...`) still match their source."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_marked_copies_have_not_drifted(capsys):
    spec = importlib.util.spec_from_file_location("check_copies", Path(__file__).with_name("check_copies.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "copy markers checked, 0 problem(s)" in out
