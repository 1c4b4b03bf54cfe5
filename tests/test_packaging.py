"""Publish-ready metadata for core and every plugin, and sdists that carry their tests.

`nox -s build` builds every wheel and sdist and runs `twine check --strict`; these tests keep the
inputs of that build right without needing the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "core", *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_metadata_is_publish_ready(package):
    text = (package / "pyproject.toml").read_text()
    data = tomllib.loads(text)
    project = data["project"]
    # PEP 639: an SPDX expression and the license file; the old table form makes setuptools warn
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
    assert (package / "LICENSE").read_text() == (ROOT / "core" / "LICENSE").read_text()
    assert "Apache License" in (package / "LICENSE").read_text()
    readme = package / project["readme"]
    assert readme.is_file() and len(readme.read_text().splitlines()) >= 20, f"{readme} is missing or a stub"
    assert {"Homepage", "Documentation"} <= set(project["urls"])
    assert "example.org" not in text
    assert data["build-system"]["requires"] == ["setuptools>=77"]  # the first setuptools with PEP 639


@pytest.mark.parametrize("package", PACKAGES[1:], ids=lambda p: p.name)
def test_sdist_manifest_carries_what_the_tests_need(package):
    manifest = (package / "MANIFEST.in").read_text().splitlines()
    for folder in ("tests", "configs", "parity"):
        if (package / folder).is_dir():
            assert f"graft {folder}" in manifest, f"{package.name}/MANIFEST.in does not graft {folder}/"
    included = " ".join(line for line in manifest if line.startswith("include "))
    for name in ("CHANGELOG.md", "PROMOTION.md", "promotion.json"):
        if (package / name).is_file():
            assert name in included, f"{package.name}/MANIFEST.in does not include {name}"
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    if project.get("entry-points", {}).get("posttrain.methods"):
        module = project["name"].replace("-", "_")
        package_data = tomllib.loads((package / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
        assert package_data[module] == ["*.schema.json"]  # the schema `posttrain info` reads ships in the wheel


def _setuptools_new_enough() -> bool:
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 77
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _setuptools_new_enough(), reason="building an sdist with PEP 639 metadata needs setuptools>=77")
def test_plugin_sdist_runs_its_tests_from_the_unpacked_archive(tmp_path):
    """Build posttrain-dpo's sdist (offline, from a copy), unpack it, check its contents and run tests there."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "plugins" / "posttrain-dpo", source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    build = "import sys; from setuptools.build_meta import build_sdist; print(build_sdist(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "License classifiers are deprecated" not in out.stderr and "project.license" not in out.stderr
    archive = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (root,) = (tmp_path / "unpacked").iterdir()
    for name in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "tests/conftest.py",
        "tests/test_loss.py",
        "tests/test_train.py",
        "tests/test_conformance.py",
        "configs/tiny.yaml",
        "configs/tiny.jsonl",
        "parity/parity_dpo.py",
        "src/posttrain_dpo/dpo.schema.json",
    ):
        assert (root / name).is_file(), f"the sdist lacks {name}"
    pkg_info = (root / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_loss.py", "tests/test_data.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
