"""posttrain promote / demote: the criteria, the textual rewrites, dry runs, demotion and retirement.

The packages under test come from the scaffold (``posttrain new``), "written" by the fixture (the
scaffold's placeholder sections replaced, a parity result measured with write_result) and never
installed; promote's own test run is replaced by a function that writes a JUnit report, so nothing here
trains a model. The real run is covered by test_scaffold.py's end-to-end test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

from posttrain import PosttrainError
from posttrain._lifecycle import promotion, scaffold
from posttrain.cli import main
from posttrain.testing.kit import API_CHECKS, FULL_CHECKS
from posttrain.testing.parity import write_result

ROOT = Path(__file__).resolve().parent.parent

# -- helpers ----------------------------------------------------------------------------------------------


def kit_report(
    path: Path,
    outcomes: dict[str, str] | None = None,
    checks=API_CHECKS + FULL_CHECKS,
    extra: dict[str, str] | None = None,
) -> Path:
    """A pytest JUnit report: one kit suite with ``checks`` (passed unless ``outcomes`` says otherwise)."""
    tags = {
        "passed": "",
        "failed": '<failure message="boom"/>',
        "error": '<error message="setup failed"/>',
        "skipped": '<skipped type="pytest.skip" message="skipped"/>',
        "xfailed": '<skipped type="pytest.xfail" message="cannot hold for this method"/>',
    }
    cases = [("tests.test_conformance.TestConformance", f"test_{c}", (outcomes or {}).get(c, "passed")) for c in checks]
    cases += [("tests.test_loss", name, outcome) for name, outcome in (extra or {"test_value": "passed"}).items()]
    body = "".join(f'<testcase classname="{cls}" name="{name}">{tags[o]}</testcase>' for cls, name, o in cases)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def author(root: Path) -> Path:
    """What an author does before promotion: write every section the scaffold left for them."""
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(
            r"^> \*\*Write before promotion:\*\*.*?(?=\n(?!>))",
            "The method's own words.",
            path.read_text(),
            flags=re.M | re.S,
        )
        path.write_text(text)
    return root


def measure(root: Path, reference=(1.0, 0.5, 0.25), measured=(1.0, 0.5000001, 0.25), tolerance=1e-4) -> Path:
    """A parity result for the package's current source, as a parity script writes it."""
    write_result(
        root / "parity" / "result.json",
        method="toy-method",
        reference="a reference implementation 1.0",
        compared="per-step training loss, 3 steps",
        tolerance=tolerance,
        comparisons={"default": (list(reference), list(measured))},
    )
    return root / "parity" / "result.json"


@pytest.fixture
def package(tmp_path) -> Path:
    """A generated package (3 - Alpha, 0.1.0), written by its author, with a parity result measured."""
    root = scaffold.generate(
        "toy-method", tmp_path / "posttrain-toy-method", author="", core_version="0.1.0", date="2026-01-01"
    )
    author(root)
    measure(root)
    return root


@pytest.fixture
def green(tmp_path, monkeypatch) -> SimpleNamespace:
    """Promote's own test run, replaced: it writes a green tier-full kit report (and counts the runs)."""
    report = kit_report(tmp_path / "kit.xml")
    runs = []

    def run_kit(pkg, path, python=sys.executable):
        runs.append(pkg.root)
        path.write_bytes(report.read_bytes())
        return subprocess.CompletedProcess(["pytest"], 0, "posttrain conformance: 12 checks ran\n", "")

    monkeypatch.setattr(promotion, "run_kit", run_kit)
    monkeypatch.setattr(promotion, "_installed_source_problem", lambda pkg: None)
    return SimpleNamespace(report=report, runs=runs)


def promote(*args) -> int:
    return main(["promote", *map(str, args)])


# -- pyproject rewrites -------------------------------------------------------------------------------------

PYPROJECT = """[build-system]
requires = ["setuptools>=64"]

[project]
name = "posttrain-x"  # the distribution
version = "0.4.2"
classifiers = [
    # kept: a comment inside the array
    "Development Status :: 3 - Alpha",
    "Programming Language :: Python :: 3",
]

[tool.other]
version = "9.9.9"
"""


def test_set_classifier_keeps_everything_else():
    after = promotion.set_classifier(PYPROJECT, 5)
    assert after == PYPROJECT.replace("3 - Alpha", "5 - Production/Stable")
    assert tomllib.loads(after)["project"]["classifiers"][0] == "Development Status :: 5 - Production/Stable"


def test_set_classifier_keeps_single_quotes():
    text = "[project]\nname = 'x'\nclassifiers = ['Development Status :: 4 - Beta']\n"
    assert promotion.set_classifier(text, 7) == text.replace("4 - Beta", "7 - Inactive")


@pytest.mark.parametrize(
    "text",
    [
        '[project]\nname = "x"\nversion = "1.0"\nclassifiers = ["Topic :: A"]\n',
        '[project]\nname = "x"\nversion = "1.0"\nclassifiers = [\n    "Topic :: A",\n]\n',
        '[project]\nname = "x"\nversion = "1.0"\n\n[tool.y]\nz = 1\n',
    ],
)
def test_set_classifier_adds_one_when_missing(text):
    project = tomllib.loads(promotion.set_classifier(text, 5))["project"]
    assert "Development Status :: 5 - Production/Stable" in project["classifiers"]
    assert set(tomllib.loads(text)["project"].get("classifiers", [])) <= set(project["classifiers"])


def test_set_version_touches_only_the_project_table():
    after = promotion.set_version(PYPROJECT, "1.0.0")
    assert after == PYPROJECT.replace('version = "0.4.2"', 'version = "1.0.0"')
    assert tomllib.loads(after)["tool"]["other"]["version"] == "9.9.9"


def test_dynamic_version_is_refused():
    with pytest.raises(PosttrainError, match="static"):
        promotion.set_version('[project]\nname = "x"\ndynamic = ["version"]\n', "1.0.0")


@pytest.mark.parametrize(
    ("version", "major", "minor"),
    [
        ("0.1.0", "1.0.0", "0.2.0"),
        ("0.9", "1.0.0", "0.10.0"),
        ("1.4.2", "2.0.0", "1.5.0"),
        ("2.0.0rc1", "3.0.0", "2.1.0"),
    ],
)
def test_version_bumps(version, major, minor):
    assert promotion.next_major(version) == major
    assert promotion.next_minor(version) == minor


# -- changelog and docs rewrites ----------------------------------------------------------------------------


def test_changelog_entry_goes_above_the_newest():
    text = "# Changelog\n\nIntro.\n\n## 0.2.0 - 2026-01-02\n\n- b\n\n## 0.1.0 - 2026-01-01\n\n- a\n"
    after = promotion.add_changelog_entry(text, "1.0.0", "2026-02-01", ["Promoted.", "Used widely."])
    assert after == text.replace("## 0.2.0", "## 1.0.0 - 2026-02-01\n\n- Promoted.\n- Used widely.\n\n## 0.2.0")


def test_changelog_unreleased_items_are_released_with_the_entry():
    text = "# Changelog\n\n## [Unreleased]\n\n- fix x\n\n## 0.1.0 - 2026-01-01\n\n- a\n"
    after = promotion.add_changelog_entry(text, "1.0.0", "2026-02-01", ["Promoted."])
    assert after == (
        "# Changelog\n\n## [Unreleased]\n\n## 1.0.0 - 2026-02-01\n\n- Promoted.\n- fix x\n\n"
        "## 0.1.0 - 2026-01-01\n\n- a\n"
    )


def test_changelog_existing_heading_for_the_version_gets_the_bullet():
    text = "# Changelog\n\n## 1.0.0\n\n- prepared by hand\n\n## 0.1.0\n\n- a\n"
    after = promotion.add_changelog_entry(text, "1.0.0", "2026-02-01", ["Promoted."])
    assert after == "# Changelog\n\n## 1.0.0\n\n- Promoted.\n- prepared by hand\n\n## 0.1.0\n\n- a\n"


def test_changelog_without_entries_gets_its_first():
    assert promotion.add_changelog_entry("# Changelog\n", "1.0.0", "2026-02-01", ["Promoted."]) == (
        "# Changelog\n\n## 1.0.0 - 2026-02-01\n\n- Promoted.\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("---\nstatus: experimental\ntitle: X\n---\n\n# x\n", "---\nstatus: stable\ntitle: X\n---\n\n# x\n"),
        ("---\ntitle: X\n---\n# x\n", "---\ntitle: X\nstatus: stable\n---\n# x\n"),
        ("# x\n\nbody\n", "---\nstatus: stable\n---\n\n# x\n\nbody\n"),
    ],
)
def test_set_docs_status(text, expected):
    assert promotion.set_docs_status(text, "stable") == expected
    assert promotion.docs_status(expected) == "stable"


def test_method_nav_groups_pages_by_status(tmp_path):
    methods = tmp_path / "methods"
    methods.mkdir()
    for name, status in [("dpo", "stable"), ("kto", "experimental"), ("old", "retired"), ("sft", "stable")]:
        (methods / f"{name}.md").write_text(f"---\nstatus: {status}\n---\n\n# {name}\n")
    (methods / "bare.md").write_text("# no front matter\n")
    (methods / "index.md").write_text("# Methods\n")  # the overview page is not a method
    assert promotion.method_nav(tmp_path) == [
        {"Stable": ["methods/dpo.md", "methods/sft.md"]},
        {"Experimental": ["methods/bare.md", "methods/kto.md"]},
        {"Retired": ["methods/old.md"]},
    ]


# -- the criteria ---------------------------------------------------------------------------------------------


def criteria(root: Path, green: SimpleNamespace) -> dict[str, promotion.Criterion]:
    pkg = promotion.read_package(root)
    page, looked = promotion.docs_page(pkg)
    return {c.name: c for c in promotion.check_criteria(pkg, page, looked)}


def test_an_authored_package_with_a_measured_result_meets_every_criterion(package, green):
    found = criteria(package, green)
    assert [c.name for c in found.values()] == ["tests", "docs", "parity", "changelog", "conformance"]
    assert all(c.passed for c in found.values()), [c.detail for c in found.values() if not c.passed]
    assert found["conformance"].evidence["suites"]["tests.test_conformance.TestConformance"]["checks"] == {
        c: "passed" for c in API_CHECKS + FULL_CHECKS
    }
    assert green.runs == [package], "promote runs the kit itself"
    evidence = found["parity"].evidence
    assert evidence["reference"] == "a reference implementation 1.0" and evidence["tolerance"] == 1e-4
    assert evidence["source"]["hash"].startswith("sha256:") and evidence["comparisons"][0]["name"] == "default"


def test_parity_missing(package, green):
    (package / "parity" / "result.json").unlink()
    c = criteria(package, green)["parity"]
    assert not c.passed and "no parity/result.json" in c.detail and "write_result" in c.detail


def test_a_benchmark_page_alone_is_not_a_result(package, green):
    (package / "parity" / "result.json").unlink()
    (package / "BENCHMARK.md").write_text("# Benchmark\n\n20 steps on the tiny model: loss 4.61 -> 2.95.\n")
    c = criteria(package, green)["parity"]
    assert not c.passed and "BENCHMARK.md is prose" in c.detail


def test_a_bare_verdict_is_refused(package, green):
    (package / "parity" / "result.json").write_text(json.dumps({"passed": True}))
    c = criteria(package, green)["parity"]
    assert not c.passed and "a bare verdict" in c.detail


def test_a_result_beyond_its_tolerance_fails(package, green):
    measure(package, measured=(1.0, 0.6, 0.25))
    c = criteria(package, green)["parity"]
    assert not c.passed and "exceeds the tolerance" in c.detail and "a reference implementation 1.0" in c.detail


def test_figures_that_do_not_give_the_recorded_statistic_fail(package, green):
    path = package / "parity" / "result.json"
    data = json.loads(path.read_text())
    data["comparisons"][0]["measured"][1] = 0.51  # edited by hand: the claim no longer follows from the figures
    path.write_text(json.dumps(data))
    c = criteria(package, green)["parity"]
    assert not c.passed and "instead of editing the file" in c.detail


def test_a_result_measured_on_other_source_fails(package, green):
    loss = package / "src" / "posttrain_toy_method" / "loss.py"
    loss.write_text(loss.read_text() + "\n# changed after the parity run\n")
    c = criteria(package, green)["parity"]
    assert not c.passed and "src/ changed since the script ran" in c.detail


def test_pycache_does_not_change_the_source_hash(package, green):
    cache = package / "src" / "posttrain_toy_method" / "__pycache__"
    cache.mkdir()
    (cache / "loss.cpython-311.pyc").write_bytes(b"compiled")
    assert criteria(package, green)["parity"].passed


def test_the_scaffold_docs_unchanged_are_refused(tmp_path, green):
    root = scaffold.generate("toy-method", tmp_path / "pkg", author="", core_version="0.1.0")
    measure(root)
    c = criteria(root, green)["docs"]
    assert not c.passed
    assert "README.md still holds text `posttrain new` left for you to write" in c.detail
    assert "'Objective', 'Deviations', 'Parity and benchmarks'" in c.detail
    assert "docs/toy-method.md still holds" in c.detail


def test_placeholder_instructions_without_their_mark_are_refused(package, green):
    readme = package / "README.md"
    readme.write_text(
        readme.read_text() + "\n## Deviations\n\na numbered list of where this implementation differs "
        'from the paper, or "None".\n'
    )
    c = criteria(package, green)["docs"]
    assert not c.passed and "a section quoting" in c.detail


def test_docs_page_and_readme_missing(package, green):
    (package / "README.md").unlink()
    (package / "docs" / "toy-method.md").unlink()
    c = criteria(package, green)["docs"]
    assert not c.passed and "README.md is missing" in c.detail and "docs/toy-method.md" in c.detail


def test_changelog_without_a_version_entry(package, green):
    (package / "CHANGELOG.md").write_text("# Changelog\n\n## Unreleased\n\n- things\n")
    c = criteria(package, green)["changelog"]
    assert not c.passed and "no `## <version>` entry" in c.detail


def test_tests_without_own_test_functions(package, green):
    for name in ("test_loss.py", "test_data.py", "test_train.py"):
        (package / "tests" / name).unlink()
    c = criteria(package, green)["tests"]
    assert not c.passed and "no test functions" in c.detail


def test_tests_without_the_conformance_kit(package, green):
    (package / "tests" / "test_conformance.py").unlink()
    c = criteria(package, green)["tests"]
    assert not c.passed and "conformance_suite" in c.detail


@pytest.mark.parametrize(
    ("outcomes", "checks", "extra", "message"),
    [
        ({}, API_CHECKS, None, "tier 'api' only"),
        ({"resume": "failed"}, API_CHECKS + FULL_CHECKS, None, "resume failed"),
        ({"metadata": "skipped"}, API_CHECKS + FULL_CHECKS, None, "metadata skipped"),
        ({}, API_CHECKS + FULL_CHECKS, {"test_value": "failed"}, "1 failing tests: tests.test_loss::test_value"),
        ({}, (), None, "no conformance-kit suite ran"),
    ],
)
def test_kit_report_problems(tmp_path, outcomes, checks, extra, message):
    ok, detail, _ = promotion.judge_kit_report(
        promotion.read_junit(kit_report(tmp_path / "r.xml", outcomes, checks, extra))
    )
    assert not ok and message in detail


def test_kit_report_declared_xfail_is_accepted_and_recorded(tmp_path):
    cases = promotion.read_junit(kit_report(tmp_path / "r.xml", {"padding_invariance": "xfailed"}))
    ok, detail, evidence = promotion.judge_kit_report(cases)
    assert ok and "1 declared xfail" in detail
    suite = evidence["suites"]["tests.test_conformance.TestConformance"]
    assert suite["xfail"] == {"padding_invariance": "cannot hold for this method"}


def test_unreadable_kit_report(tmp_path):
    (tmp_path / "r.xml").write_text("not xml")
    with pytest.raises(PosttrainError, match="cannot read the kit report"):
        promotion.read_junit(tmp_path / "r.xml")


def test_conformance_needs_the_package_installed_from_this_tree(package):
    c = promotion.check_conformance(promotion.read_package(package))
    assert not c.passed and "not installed" in c.detail and f"pip install -e {package}" in c.detail


def test_run_kit_runs_pytest_and_reads_its_report(tmp_path):
    """The subprocess path, on a package whose kit-shaped suite needs no model (seconds, not minutes)."""
    root = tmp_path / "pkg"
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "posttrain-fake"\nversion = "0.1.0"\n'
        '[project.entry-points."posttrain.methods"]\nfake = "fake:Fake"\n'
        '[tool.pytest.ini_options]\naddopts = "-p posttrain.testing.kit"\n'
    )
    body = "".join(f"    def test_{c}(self):\n        pass\n\n" for c in API_CHECKS + FULL_CHECKS)
    (root / "tests" / "test_conformance.py").write_text(f"class TestConformance:\n{body}")
    (root / "tests" / "test_own.py").write_text("def test_own():\n    assert 1 + 1 == 2\n")
    report = tmp_path / "report.xml"
    proc = promotion.run_kit(promotion.read_package(root), report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok, detail, evidence = promotion.judge_kit_report(promotion.read_junit(report))
    assert ok, detail
    n = len(API_CHECKS + FULL_CHECKS) + 1  # every kit check, and the package's own test
    assert evidence["tests"] == n and evidence["passed"] == n
    assert not list(root.rglob("__pycache__")), "the test run must leave the source tree as it was"


# -- finding the package and its docs page -------------------------------------------------------------------


def test_find_package_by_path_name_and_working_directory(tmp_path):
    repo = tmp_path / "repo"
    (repo / "plugins").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[tool.ruff]\nline-length = 120\n")  # a workspace file, not a package
    root = scaffold.generate("kto", repo / "plugins" / "posttrain-kto", author="", core_version="0.1.0")
    assert promotion.find_package(str(root)) == root
    assert promotion.find_package("kto", cwd=repo / "docs") == root  # found from anywhere in the repository
    assert promotion.find_package(None, cwd=root / "src" / "posttrain_kto") == root
    with pytest.raises(PosttrainError, match=r"no method package's pyproject\.toml"):
        promotion.find_package(None, cwd=repo)
    with pytest.raises(PosttrainError, match="cannot find method package 'zz-nothing'"):
        promotion.find_package("zz-nothing", cwd=repo)


def test_find_package_from_an_editable_install(tmp_path, fake_site):
    root = scaffold.generate("zz-edit", tmp_path / "src-tree", author="", core_version="0.1.0")
    dist = fake_site.add("posttrain-zz-edit", status="3 - Alpha", methods={"zz-edit": "posttrain_zz_edit:ZzEdit"})
    (dist / "direct_url.json").write_text(json.dumps({"url": root.as_uri(), "dir_info": {"editable": True}}))
    assert promotion.find_package("zz-edit", cwd=tmp_path) == root
    fake_site.add("posttrain-zz-wheel", methods={"zz-wheel": "x:Y"})
    with pytest.raises(PosttrainError, match="not from a local source tree"):
        promotion.find_package("zz-wheel", cwd=tmp_path)


def test_docs_page_of_a_repository_plugin_is_the_repository_page(tmp_path):
    repo = tmp_path / "repo"
    root = scaffold.generate("kto", repo / "plugins" / "posttrain-kto", author="", core_version="0.1.0")
    text = root.joinpath("pyproject.toml").read_text()
    root.joinpath("pyproject.toml").write_text(text[: text.index("[tool.posttrain]")])  # as the repo's plugins are
    (repo / "docs" / "methods").mkdir(parents=True)
    (repo / "docs" / "methods" / "kto.md").write_text("# kto\n\nPage.\n")
    page, looked = promotion.docs_page(promotion.read_package(root))
    assert page == repo / "docs" / "methods" / "kto.md"
    assert looked == [page, root / "docs" / "kto.md"]
    override, _ = promotion.docs_page(promotion.read_package(root), root / "docs" / "kto.md")
    assert override == root / "docs" / "kto.md"


# -- the commands ---------------------------------------------------------------------------------------------


def test_promote_refuses_and_changes_nothing_when_a_criterion_fails(package, green, capsys):
    (package / "parity" / "result.json").unlink()
    before = snapshot(package)
    assert promote(package) == 1
    out = capsys.readouterr().out
    assert "[FAIL] parity or benchmark result: no parity/result.json" in out
    assert (
        "Not promoted: 1 of 5 criteria failed (parity). Nothing was changed. The criteria are explained in "
        "https://posttrain.readthedocs.io/promotion/" in out
    )
    assert snapshot(package) == before


def test_promote_dry_run_shows_the_diff_and_changes_nothing(package, green, capsys):
    before = snapshot(package)
    assert promote(package, "--dry-run") == 0
    out = capsys.readouterr().out
    assert snapshot(package) == before
    assert '+version = "1.0.0"' in out and '-version = "0.1.0"' in out
    assert "+status: stable" in out and "+## 1.0.0 - " in out
    assert "create promotion.json" in out and "create PROMOTION.md" in out


def test_promote_rewrites_the_package_and_writes_the_record(package, green, capsys):
    assert promote(package, "--note", "used by two teams") == 0
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert project["version"] == "1.0.0"
    assert project["classifiers"] == ["Development Status :: 5 - Production/Stable"]
    assert project["dependencies"] == ["posttrain>=0.1,<1"]
    changelog = (package / "CHANGELOG.md").read_text()
    assert changelog.index("## 1.0.0 - ") < changelog.index("## 0.1.0 - 2026-01-01")
    assert "- Promoted to stable" in changelog and "- used by two teams" in changelog
    assert promotion.docs_status((package / "docs" / "toy-method.md").read_text()) == "stable"
    record = json.loads((package / "promotion.json").read_text())
    assert record["distribution"] == "posttrain-toy-method" and record["names"] == ["toy-method"]
    (event,) = record["events"]
    assert event["action"] == "promote" and event["note"] == "used by two teams"
    assert event["version"] == {"from": "0.1.0", "to": "1.0.0"}
    assert event["status"] == {"from": "3 - Alpha", "to": "5 - Production/Stable"}
    assert event["docs_status"] == {"from": "experimental", "to": "stable"}
    assert [c["name"] for c in event["criteria"] if c["passed"]] == [
        "tests",
        "docs",
        "parity",
        "changelog",
        "conformance",
    ]
    md = (package / "PROMOTION.md").read_text()
    assert "## 1.0.0: promoted to stable" in md
    assert "| parity or benchmark result | passed | parity/result.json (posttrain.result/1): max_rel_diff 2e-07" in md
    assert promotion.verify_record(package) == []
    capsys.readouterr()
    assert promote(package) == 2
    assert "already stable" in capsys.readouterr().err


def test_promote_a_repository_plugin_moves_the_repository_docs_page(tmp_path, green, monkeypatch):
    repo = tmp_path / "repo"
    root = scaffold.generate("kto", repo / "plugins" / "posttrain-kto", author="", core_version="0.1.0")
    (root / "docs").rename(tmp_path / "unused")
    text = root.joinpath("pyproject.toml").read_text()
    root.joinpath("pyproject.toml").write_text(text[: text.index("[tool.posttrain]")])
    author(root)
    measure(root)
    (repo / "docs" / "methods").mkdir(parents=True)
    (repo / "docs" / "methods" / "kto.md").write_text("# kto\n\nPage.\n")
    monkeypatch.chdir(repo / "docs")
    assert promote("kto") == 0  # NAME: plugins/posttrain-kto above the working directory
    assert (repo / "docs" / "methods" / "kto.md").read_text() == "---\nstatus: stable\n---\n\n# kto\n\nPage.\n"
    event = json.loads((root / "promotion.json").read_text())["events"][0]
    assert event["docs_page"] == "../../docs/methods/kto.md"


def test_demote_then_retire(package, green, capsys):
    assert promote(package) == 0
    assert main(["demote", str(package), "--reason", "superseded by posttrain-better"]) == 0
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert project["version"] == "1.1.0"
    assert project["classifiers"] == ["Development Status :: 4 - Beta"]
    assert promotion.docs_status((package / "docs" / "toy-method.md").read_text()) == "deprecated"
    changelog = (package / "CHANGELOG.md").read_text()
    assert "## 1.1.0 - " in changelog and "- Reason: superseded by posttrain-better" in changelog
    capsys.readouterr()
    assert main(["demote", str(package)]) == 2  # not stable any more
    assert "only a stable package is demoted" in capsys.readouterr().err

    assert main(["demote", "--retire", str(package)]) == 0
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert project["version"] == "1.2.0"
    assert project["classifiers"] == ["Development Status :: 7 - Inactive"]
    assert promotion.docs_status((package / "docs" / "toy-method.md").read_text()) == "retired"
    events = json.loads((package / "promotion.json").read_text())["events"]
    assert [e["action"] for e in events] == ["promote", "demote", "retire"]
    assert "criteria" not in events[1] and events[1]["note"] == "superseded by posttrain-better"
    md = (package / "PROMOTION.md").read_text()
    assert md.index("## 1.2.0: retired") < md.index("## 1.1.0: demoted") < md.index("## 1.0.0: promoted")
    assert main(["demote", "--retire", str(package)]) == 2
    assert "already retired" in capsys.readouterr().err


def test_retire_an_experimental_package_and_dry_runs(package, capsys):
    before = snapshot(package)
    assert main(["demote", str(package), "--retire", "--dry-run"]) == 0
    assert snapshot(package) == before
    out = capsys.readouterr().out
    assert '+classifiers = ["Development Status :: 7 - Inactive"]' in out and "+status: retired" in out
    assert main(["demote", str(package), "--retire"]) == 0
    assert tomllib.loads((package / "pyproject.toml").read_text())["project"]["version"] == "0.2.0"


def test_promote_without_a_kit_report_in_a_subprocess_reports_the_install_problem(package):
    """The command line end to end, in a fresh process: an uninstalled package cannot pass the kit."""
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "promote", str(package)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 1, out.stderr
    assert "[FAIL] conformance kit green at tier full: posttrain-toy-method is not installed" in out.stdout


def test_docs_page_option(package, green, tmp_path):
    elsewhere = tmp_path / "site" / "toy-method.md"
    elsewhere.parent.mkdir()
    elsewhere.write_text("# toy-method\n\nThe page the site builds.\n")
    assert promote(package, "--docs-page", elsewhere) == 0
    assert promotion.docs_status(elsewhere.read_text()) == "stable"
    assert promotion.docs_status((package / "docs" / "toy-method.md").read_text()) == "experimental"
    assert main(["demote", str(package), "--docs-page", str(elsewhere)]) == 0
    assert promotion.docs_status(elsewhere.read_text()) == "deprecated"


def test_a_report_handed_in_is_not_accepted(package, green, capsys):
    """A JUnit file is as easy to write as to run: promote always runs the kit itself."""
    with pytest.raises(SystemExit):
        promote(package, "--kit-report", green.report)
    assert "unrecognized arguments: --kit-report" in capsys.readouterr().err


PARITY_SCRIPT = """
from pathlib import Path

from posttrain.testing.parity import write_result

write_result(
    Path(__file__).parent / "result.json",
    method="toy-method",
    reference="a reference implementation 1.0",
    compared="per-step training loss, 2 steps",
    tolerance=1e-4,
    comparisons={"default": ([2.0, 1.0], [2.0, 1.00000001])},
)
"""


def test_run_parity_measures_on_the_current_source(package, green, capsys):
    loss = package / "src" / "posttrain_toy_method" / "loss.py"
    loss.write_text(loss.read_text() + "\n# changed after the last parity run\n")
    (package / "parity" / "parity_toy.py").write_text(PARITY_SCRIPT)
    assert promote(package, "--dry-run") == 1  # the recorded result is stale
    assert "src/ changed since the script ran" in capsys.readouterr().out
    assert promote(package, "--dry-run", "--run-parity") == 0
    out = capsys.readouterr().out
    assert "ran parity/parity_toy.py: exit 0" in out and "[ok]   parity or benchmark result" in out


@pytest.mark.parametrize("plugin", sorted(p.parent.name for p in ROOT.glob("plugins/*/promotion.json")))
def test_the_promotion_records_of_this_repository_verify(plugin):
    """Records of promoted plugins hold what promotion needs today: passed criteria, a green kit, and a
    posttrain.result/1 parity result (reference, figures, tolerance, source hash) the statistic follows from."""
    assert promotion.verify_record(ROOT / "plugins" / plugin) == []


def test_a_record_with_a_bare_parity_verdict_does_not_verify(package, green, tmp_path):
    assert promote(package) == 0
    record = json.loads((package / "promotion.json").read_text())
    parity = next(c for c in record["events"][0]["criteria"] if c["name"] == "parity")
    parity["evidence"] = {"file": "parity/result.json", "passed": True}
    (package / "promotion.json").write_text(json.dumps(record))
    assert any("bare verdict" in p for p in promotion.verify_record(package))
