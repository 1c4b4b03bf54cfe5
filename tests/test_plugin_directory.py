"""The plugin index and the docs page generated from it (docs/plugins.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "hooks" / "plugin_directory.py"


def directory_module():
    spec = importlib.util.spec_from_file_location("plugin_directory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_and_page_are_up_to_date(capsys):
    """Fails when a plugin's pyproject.toml (status, core range, names) or the index changed without the page."""
    code = directory_module().main(["--check"])
    assert code == 0, capsys.readouterr().err


def test_every_plugin_of_the_repository_is_in_the_index():
    index = json.loads((ROOT / "core/src/posttrain/cli/plugin_index.json").read_text())
    official = {p["package"] for p in index["packages"] if p["origin"] == "official"}
    assert official == {p.name for p in ROOT.glob("plugins/*") if (p / "pyproject.toml").is_file()}
    for entry in index["packages"]:
        assert entry["status"] in ("stable", "experimental", "inactive"), entry["package"]
        assert set(entry) >= {"package", "origin", "summary", "status", "requires_core", "methods", "rewards"}


def test_page_renders_third_party_packages_with_their_links():
    module = directory_module()
    index = {
        "version": 1,
        "packages": [
            {
                "package": "acme-posttrain-simpo",
                "origin": "third-party",
                "summary": "SimPO.",
                "status": "experimental",
                "requires_core": ">=0.1,<1",
                "methods": ["simpo"],
                "rewards": [],
                "environments": ["sandbox"],
                "commands": [],
                "docs": "https://acme.example/simpo",
                "source": "https://git.example/acme/simpo",
                "published": True,
            }
        ],
    }
    page = module.render(index)
    row = next(line for line in page.splitlines() if "acme-posttrain-simpo" in line)
    assert "method `simpo`; environment `sandbox`" in row and "experimental" in row and "`>=0.1,<1`" in row
    assert "`posttrain install acme-posttrain-simpo`" in row
    assert "[docs](https://acme.example/simpo)" in row and "[source](https://git.example/acme/simpo)" in row
    assert "None are listed yet" not in page


def test_page_is_in_the_docs_navigation():
    assert "plugins.md" in (ROOT / "mkdocs.yml").read_text()
