"""Promotion, demotion and retirement of a method package: the criteria and the file rewrites.

``posttrain promote`` checks the criteria of docs/promotion.md against a package's source tree and,
only when all hold, writes ``Development Status :: 5 - Production/Stable``, the next major version, a
CHANGELOG entry, ``status: stable`` in the docs page's front matter and a record (``promotion.json``,
``PROMOTION.md``); ``demote [--retire]`` goes back. Rewrites are textual (layout and comments stay) and
checked by parsing the result. Standard library only: the conformance kit and the parity scripts run in
subprocesses; promote judges what it ran or measured, never a verdict handed to it.
"""

from __future__ import annotations

import ast
import datetime
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from posttrain._errors import PosttrainError

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

STATUS = {
    1: "1 - Planning",
    2: "2 - Pre-Alpha",
    3: "3 - Alpha",
    4: "4 - Beta",
    5: "5 - Production/Stable",
    6: "6 - Mature",
    7: "7 - Inactive",
}
STABLE, DEMOTED, RETIRED = 5, 4, 7
DOCS_STATUSES = ("stable", "experimental", "deprecated", "retired")  # also the docs nav sections, in order
GROUPS = ("posttrain.methods", "posttrain.rewards", "posttrain.plugins")
RECORD_JSON, RECORD_MD = "promotion.json", "PROMOTION.md"
PARITY_RESULT, BENCHMARK = Path("parity", "result.json"), Path("BENCHMARK.md")

_CLASSIFIER = re.compile(r"""(["'])Development Status\s*::\s*(\d)[^"']*\1""")
_HEADING = re.compile(r"^##\s+\[?([^\]\s]+)\]?.*$", re.M)
_FRONT_MATTER = re.compile(r"\A---\n(.*?\n)?---\n", re.S)


# -- the package --------------------------------------------------------------------------------------


@dataclass
class Package:
    """A method package's source tree, as promotion sees it."""

    root: Path
    text: str  # pyproject.toml as written
    project: dict  # its parsed [project] table
    tool: dict  # its parsed [tool.posttrain] table
    names: list[str]  # entry-point names it provides
    distribution: str
    version: str  # "" when dynamic
    level: int | None  # the Development Status number (the lowest, as discovery reads it)


def _parse_toml(text: str, path: Path) -> dict:
    if tomllib is None:
        raise PosttrainError("reading pyproject.toml needs Python 3.11+ (tomllib) or `pip install tomli`.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PosttrainError(f"{path} is not valid TOML: {exc}") from None


def read_package(root: str | Path) -> Package:
    """Read ``root/pyproject.toml``. Raises PosttrainError when it is not a posttrain package."""
    root = Path(root).resolve()
    path = root / "pyproject.toml"
    if not path.is_file():
        raise PosttrainError(f"{root} has no pyproject.toml; give the source tree of a method package.")
    text = path.read_text(encoding="utf-8")
    data = _parse_toml(text, path)
    project = data.get("project") or {}
    eps = project.get("entry-points") or {}
    names = [name for group in GROUPS for name in eps.get(group, {})]
    if not project.get("name") or not names:
        raise PosttrainError(
            f'{path} declares no posttrain entry points ([project.entry-points."posttrain.methods"]); '
            "it is not a posttrain method package."
        )
    levels = [int(m.group(2)) for c in project.get("classifiers", []) if (m := _CLASSIFIER.match(f'"{c}"'))]
    return Package(
        root,
        text,
        project,
        data.get("tool", {}).get("posttrain", {}),
        names,
        project["name"],
        str(project.get("version", "")),
        min(levels) if levels else None,
    )


def install_source(dist: metadata.Distribution) -> Path | None:
    """The local directory a distribution was installed from (PEP 610 direct_url.json), if any."""
    raw = dist.read_text("direct_url.json")
    url = json.loads(raw).get("url", "") if raw else ""
    if not url.startswith("file://"):
        return None
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(url).path))


def find_package(target: str | None, cwd: str | Path | None = None) -> Path:
    """The source tree for ``NAME_OR_PATH``: a path; ``plugins/posttrain-NAME`` in the working directory
    or above it; the source of an editable install providing NAME; or, with no target, the package
    whose tree holds the working directory."""
    cwd = Path(cwd or Path.cwd()).resolve()
    if target is None:
        for d in (cwd, *cwd.parents):
            if (d / "pyproject.toml").is_file():
                try:
                    return read_package(d).root
                except PosttrainError:
                    pass  # a workspace pyproject.toml, not a package: keep looking upwards
        raise PosttrainError(
            f"no method package's pyproject.toml in {cwd} or above it; run inside a method "
            "package's source tree, or give its NAME or PATH."
        )
    path = (cwd / target).resolve()
    if path.is_dir() or path.name == "pyproject.toml":
        return read_package(path if path.is_dir() else path.parent).root
    from posttrain._discovery import NAME_RE

    if not NAME_RE.match(target):
        raise PosttrainError(f"{target!r} is neither a directory nor a method name ([a-z][a-z0-9_-]*).")
    for d in (cwd, *cwd.parents):
        if (d / "plugins" / f"posttrain-{target}" / "pyproject.toml").is_file():
            return d / "plugins" / f"posttrain-{target}"
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == f"posttrain-{target}" or any(ep.name == target and ep.group in GROUPS for ep in dist.entry_points):
            source = install_source(dist)
            if source is not None and (source / "pyproject.toml").is_file():
                return source
            raise PosttrainError(
                f"{target!r} is installed from {dist.metadata['Name']} {dist.version}, not from a "
                "local source tree; run inside the package's source tree or give its path."
            )
    raise PosttrainError(
        f"cannot find method package {target!r}: no plugins/posttrain-{target} here or above, and no "
        "installed distribution provides it. Give the package's path instead."
    )


def docs_page(pkg: Package, override: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """(the docs page, every place looked): --docs-page, ``[tool.posttrain] docs-page``, the repository's
    ``docs/methods/<name>.md`` (for a package under ``plugins/``), then ``docs/<name>.md`` in the package."""
    candidates = []
    if override:
        candidates.append(Path(override).resolve())
    elif pkg.tool.get("docs-page"):
        candidates.append((pkg.root / pkg.tool["docs-page"]).resolve())
    else:
        repo = pkg.root.parent.parent if pkg.root.parent.name == "plugins" else None
        for name in pkg.names:
            if repo is not None:
                candidates.append(repo / "docs" / "methods" / f"{name}.md")
            candidates.append(pkg.root / "docs" / f"{name}.md")
    return next((c for c in candidates if c.is_file()), None), candidates


# -- the criteria -------------------------------------------------------------------------------------


@dataclass
class Criterion:
    """One promotion criterion's result: what was found, or what is missing and how to fix it."""

    name: str
    title: str
    passed: bool
    detail: str
    evidence: dict = field(default_factory=dict)


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the package root (``../../docs/methods/x.md`` for a repository's docs page)."""
    return os.path.relpath(path, root)


def check_tests(pkg: Package) -> Criterion:
    """Tests beyond the conformance kit: at least one ``test_*`` function of the package's own."""
    title = "tests present"
    files = sorted((pkg.root / "tests").glob("**/test_*.py")) if (pkg.root / "tests").is_dir() else []
    own, kit_files = 0, []
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        if "conformance_suite" in {
            n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
        }:
            kit_files.append(display_path(f, pkg.root))
        own += sum(
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test") for n in ast.walk(tree)
        )
    evidence = {
        "files": [display_path(f, pkg.root) for f in files],
        "test_functions": own,
        "conformance_files": kit_files,
    }
    if own == 0:
        return Criterion(
            "tests",
            title,
            False,
            "tests/ has no test functions of the package's own; add tests/test_*.py "
            "(hand-computed loss values, exact collator tensors, a tiny model that learns).",
            evidence,
        )
    if not kit_files:
        return Criterion(
            "tests",
            title,
            False,
            f"{own} test functions, but no tests/test_*.py calls "
            "posttrain.testing.kit.conformance_suite(...); add tests/test_conformance.py.",
            evidence,
        )
    return Criterion(
        "tests",
        title,
        True,
        f"{len(files)} test files, {own} test functions, conformance suite in {', '.join(kit_files)}",
        evidence,
    )


def check_docs(pkg: Package, page: Path | None, looked: list[Path]) -> Criterion:
    """A README (pyproject's ``readme``, else README.md) and a docs page, both with text the author wrote.

    A section ``posttrain new`` left for the author (a blockquote starting "Write before promotion:", or its
    instructions with the mark removed) fails the criterion, naming the file and the section.
    """
    title = "README and docs page"
    readme_field = pkg.project.get("readme", "README.md")
    readme = pkg.root / (readme_field.get("file", "README.md") if isinstance(readme_field, dict) else readme_field)
    missing = []
    if not readme.is_file() or not readme.read_text(encoding="utf-8").strip():
        missing.append(f"{display_path(readme, pkg.root)} is missing or empty")
    if page is None:
        missing.append(
            "no docs page (looked for " + ", ".join(display_path(p, pkg.root) for p in looked) + "); write one, "
            "or point [tool.posttrain] docs-page in pyproject.toml at it"
        )
    elif not _FRONT_MATTER.sub("", page.read_text(encoding="utf-8")).strip():
        missing.append(f"the docs page {display_path(page, pkg.root)} is empty")
    for path in (readme, page):
        if path is not None and path.is_file():
            sections = placeholder_sections(path.read_text(encoding="utf-8"))
            if sections:
                missing.append(
                    f"{display_path(path, pkg.root)} still holds text `posttrain new` left for you to write, in "
                    f"{', '.join(repr(s) for s in sections)}: replace each such quoted block with the method's own "
                    "description"
                )
    evidence = {"readme": display_path(readme, pkg.root), "docs_page": display_path(page, pkg.root) if page else None}
    if missing:
        return Criterion("docs", title, False, "; ".join(missing) + ".", evidence)
    return Criterion("docs", title, True, f"{evidence['readme']}, docs page {evidence['docs_page']}", evidence)


def placeholder_sections(text: str) -> list[str]:
    """Headings of the sections of ``text`` that still hold a scaffold placeholder (the mark or its instructions)."""
    from posttrain._lifecycle import scaffold

    phrases = scaffold.placeholder_phrases()
    flat = " ".join(line.lstrip("> ").strip() for line in text.splitlines())
    found, heading = [], "(top)"
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if scaffold.PLACEHOLDER_MARK in line and heading not in found:
            found.append(heading)
    for phrase in phrases:
        if phrase in flat and not found:
            found.append(f"a section quoting {phrase[:40]!r}...")
    return found


def check_parity(pkg: Package) -> Criterion:
    """``parity/result.json`` in the ``posttrain.result/1`` format: figures that give a statistic within its
    tolerance, measured on the package's current source (:func:`posttrain.testing.parity.result_problems`)."""
    from posttrain.testing.parity import FORMAT, read_result, result_problems

    title = "parity or benchmark result"
    path = pkg.root / PARITY_RESULT
    scripts = parity_scripts(pkg)
    run_hint = (
        f"run {', '.join(display_path(s, pkg.root) for s in scripts)} (or `posttrain promote --run-parity`)"
        if scripts
        else "write a script in parity/ that measures the method against a reference implementation (or a "
        "baseline) and records the figures with posttrain.testing.parity.write_result"
    )
    if not path.is_file():
        bench = " (BENCHMARK.md is prose: record its figures with write_result(kind='benchmark'))"
        extra = bench if (pkg.root / BENCHMARK).is_file() else ""
        return Criterion("parity", title, False, f"no {PARITY_RESULT}{extra}: {run_hint}.")
    try:
        data = read_result(path)
    except ValueError as exc:
        return Criterion("parity", title, False, f"{exc}.")
    problems = result_problems(data, pkg.root)
    evidence = {"file": str(PARITY_RESULT), **{k: v for k, v in data.items() if k != "details"}}
    if problems:
        return Criterion(
            "parity", title, False, f"{PARITY_RESULT}: " + "; ".join(problems) + f". Then {run_hint}.", evidence
        )
    return Criterion(
        "parity",
        title,
        True,
        f"{PARITY_RESULT} ({FORMAT}): {data['statistic']} {data['measured']:.3g} <= {data['tolerance']:.3g} against "
        f"{data['reference']} ({len(data['comparisons'])} comparisons; source {data['source']['hash'][:19]}...)",
        evidence,
    )


def parity_scripts(pkg: Package) -> list[Path]:
    """The package's parity or benchmark scripts: ``[tool.posttrain] parity-script``, else ``parity/*.py``."""
    declared = pkg.tool.get("parity-script")
    if declared:
        return [pkg.root / declared]
    return sorted((pkg.root / "parity").glob("*.py")) if (pkg.root / "parity").is_dir() else []


def run_parity(pkg: Package, python: str = sys.executable) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Run each parity script in a subprocess from the package root; each writes ``parity/result.json``."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return [
        (s, subprocess.run([python, str(s)], cwd=pkg.root, capture_output=True, text=True, env=env))
        for s in parity_scripts(pkg)
    ]


def check_changelog(pkg: Package) -> Criterion:
    """CHANGELOG.md with at least one ``## <version>`` entry."""
    path = pkg.root / "CHANGELOG.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    versions = [m.group(1) for m in _HEADING.finditer(text) if m.group(1).lower() != "unreleased"]
    if not versions:
        problem = "CHANGELOG.md has no `## <version>` entry" if path.is_file() else "no CHANGELOG.md"
        return Criterion(
            "changelog", "changelog", False, f"{problem}; add a `## <version> - <date>` entry per release."
        )
    return Criterion(
        "changelog",
        "changelog",
        True,
        f"CHANGELOG.md, latest entry {versions[0]}",
        {"file": "CHANGELOG.md", "latest": versions[0]},
    )


def read_junit(path: str | Path) -> list[dict]:
    """Test cases of a pytest JUnit XML report: classname, name, outcome, message.

    Outcomes: passed, failed, error, skipped, xfailed (pytest writes an xfail as ``skipped`` with
    ``type="pytest.xfail"``).
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise PosttrainError(f"cannot read the kit report {path}: {exc}; give a pytest --junitxml file.") from None
    cases = []
    for case in root.iter("testcase"):
        found = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = (
            "passed"
            if found is None
            else "xfailed"
            if found.get("type") == "pytest.xfail"
            else {"failure": "failed"}.get(found.tag, found.tag)
        )
        cases.append(
            {
                "classname": case.get("classname", ""),
                "name": case.get("name", ""),
                "outcome": outcome,
                "message": "" if found is None else found.get("message", ""),
            }
        )
    return cases


def judge_kit_report(cases: list[dict]) -> tuple[bool, str, dict]:
    """Whether a test run shows the conformance kit green at tier full, and every other test passing.

    A kit suite is a test class holding all the kit's api-tier checks; tier full means it also holds
    every full-tier check. Each check must pass or be a declared xfail; a plain skip fails it.
    """
    from posttrain.testing.kit import API_CHECKS, FULL_CHECKS

    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped", "xfailed")}
    by_class: dict[str, dict[str, dict]] = {}
    for c in cases:
        by_class.setdefault(c["classname"], {})[c["name"]] = c
    suites = {cls: tests for cls, tests in by_class.items() if all(f"test_{k}" in tests for k in API_CHECKS)}
    evidence = {"tests": len(cases), **counts, "suites": {}}
    problems = []
    for cls, tests in suites.items():
        checks = {
            k: tests[f"test_{k}"]["outcome"] if f"test_{k}" in tests else "absent" for k in API_CHECKS + FULL_CHECKS
        }
        evidence["suites"][cls] = {
            "checks": checks,
            "xfail": {k: tests[f"test_{k}"]["message"] for k, o in checks.items() if o == "xfailed"},
        }
        if "absent" in checks.values():
            problems.append(f"{cls} runs tier 'api' only; pass tier=\"full\" to conformance_suite")
        bad = [f"{k} {o}" for k, o in checks.items() if o not in ("passed", "xfailed", "absent")]
        if bad:
            problems.append(f"{cls}: " + ", ".join(bad))
    if not suites:
        problems.append("no conformance-kit suite ran; tests/ must call posttrain.testing.kit.conformance_suite(...)")
    failing = [f"{c['classname']}::{c['name']}" for c in cases if c["outcome"] in ("failed", "error")]
    if failing:
        problems.append(
            f"{len(failing)} failing tests: " + ", ".join(failing[:5]) + (" ..." if len(failing) > 5 else "")
        )
    n_checks = sum(len(s["checks"]) for s in evidence["suites"].values())
    n_xfail = sum(len(s["xfail"]) for s in evidence["suites"].values())
    summary = (
        f"{len(suites)} kit suite(s), {n_checks} checks ({n_xfail} declared xfail); {len(cases)} tests: "
        f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, {counts['xfailed']} xfailed, "
        f"{counts['skipped']} skipped"
    )
    return not problems, "; ".join(problems) + "." if problems else summary, evidence


def run_kit(pkg: Package, report: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run the package's tests (conformance kit loaded) with pytest in a subprocess, writing ``report``."""
    command = [
        python,
        "-m",
        "pytest",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "posttrain.testing.kit",
        f"--junitxml={report}",
        "-o",
        "junit_family=xunit2",
    ]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave the source tree as it was
    return subprocess.run(command, cwd=pkg.root, capture_output=True, text=True, env=env)


def _installed_source_problem(pkg: Package) -> str | None:
    """Why the installed copy of the package is not this tree (the kit checks installed metadata)."""
    try:
        dist = metadata.distribution(pkg.distribution)
    except metadata.PackageNotFoundError:
        where = f"{pkg.distribution} is not installed in this Python ({sys.executable})"
    else:
        source = install_source(dist)
        if source is not None and source.resolve() == pkg.root:
            return None
        where = f"the installed {pkg.distribution} {dist.version} comes from {source or 'a package index'}"
    return f"{where}, and the kit checks installed metadata: run `pip install -e {pkg.root}` first"


def check_conformance(pkg: Package) -> Criterion:
    """The conformance kit green at tier full, in a fresh pytest run of the package's tests (never a report
    handed in: a report is as easy to write as to run)."""
    title = "conformance kit green at tier full"
    problem = _installed_source_problem(pkg)
    if problem:
        return Criterion("conformance", title, False, problem + ".")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "kit-report.xml"
        started = datetime.datetime.now()
        proc = run_kit(pkg, report)
        seconds = round((datetime.datetime.now() - started).total_seconds(), 1)
        if not report.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            return Criterion("conformance", title, False, f"pytest exited {proc.returncode} without a report:\n{tail}")
        ok, detail, evidence = judge_kit_report(read_junit(report))
    summary = next((ln for ln in proc.stdout.splitlines() if ln.startswith("posttrain conformance:")), "")
    evidence = {"source": "pytest tests -p posttrain.testing.kit", "seconds": seconds, "summary": summary, **evidence}
    if ok and proc.returncode != 0:
        ok, detail = False, f"pytest exited {proc.returncode}: " + "\n".join(proc.stdout.strip().splitlines()[-5:])
    return Criterion("conformance", title, ok, detail + f" ({seconds} s)", evidence)


def check_preconditions(pkg: Package, action: str) -> None:
    """Refuse what makes no sense before checking anything: promoting a stable package, and so on."""
    level, where = pkg.level, f"{pkg.distribution} {pkg.version}"
    declared = f"Development Status :: {STATUS.get(level or 0, 'none')}" if level else "no Development Status"
    if action == "promote" and level in (5, 6):
        raise PosttrainError(f"{where} is already stable ({declared}); nothing to promote.")
    if action == "demote" and level not in (5, 6):
        raise PosttrainError(
            f"{where} is not stable ({declared}); only a stable package is demoted. "
            "To retire it, run `posttrain demote --retire`."
        )
    if action == "retire" and level == RETIRED:
        raise PosttrainError(f"{where} is already retired ({declared}).")
    set_version(pkg.text, pkg.version)  # a dynamic version cannot be bumped: say so before any work


def check_criteria(
    pkg: Package,
    page: Path | None,
    looked: list[Path],
    on_kit_start: Callable[[], None] | None = None,
) -> list[Criterion]:
    """Every criterion, cheapest first; the test run (announced through ``on_kit_start``) last."""
    found = [check_tests(pkg), check_docs(pkg, page, looked), check_parity(pkg), check_changelog(pkg)]
    if on_kit_start is not None:
        on_kit_start()
    return [*found, check_conformance(pkg)]


# -- textual rewrites -----------------------------------------------------------------------------------


def _project_span(text: str) -> tuple[int, int]:
    start = re.search(r"^\[project\]\s*$", text, re.M)
    if not start:
        raise PosttrainError("pyproject.toml has no [project] table")
    end = re.compile(r"^\[", re.M).search(text, start.end())
    return start.end(), end.start() if end else len(text)


def set_classifier(text: str, level: int) -> str:
    """Set the ``Development Status`` classifier (adding one when there is none), keeping the rest."""
    new = f"Development Status :: {STATUS[level]}"
    start, end = _project_span(text)
    if _CLASSIFIER.search(text, start, end):
        table = _CLASSIFIER.sub(lambda m: f"{m.group(1)}{new}{m.group(1)}", text[start:end])
        return text[:start] + table + text[end:]
    array = re.compile(r"^(\s*classifiers\s*=\s*\[)([ \t]*\n?)([ \t]*)", re.M).search(text, start, end)
    if array:
        inline = not array.group(2).endswith("\n")
        item = f'"{new}", ' if inline else f'{array.group(3) or "    "}"{new}",\n'
        where = array.end(1) if inline else array.end(2)
        return text[:where] + item + text[where:]
    version = re.compile(r"^\s*version\s*=.*\n", re.M).search(text, start, end)
    where = version.end() if version else start + 1
    return text[:where] + f'classifiers = ["{new}"]\n' + text[where:]


def set_version(text: str, version: str) -> str:
    """Rewrite the static ``version = "..."`` of [project]."""
    start, end = _project_span(text)
    m = re.compile(r"""^(\s*version\s*=\s*)(["'])[^"']*\2""", re.M).search(text, start, end)
    if not m:
        raise PosttrainError(
            'pyproject.toml has no static `version = "..."` in [project] (a dynamic version?); '
            "promotion bumps a static version only: write it in pyproject.toml."
        )
    return text[: m.start()] + f"{m.group(1)}{m.group(2)}{version}{m.group(2)}" + text[m.end() :]


def _release(version: str) -> list[int]:
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    if not parts:
        raise PosttrainError(f"cannot read version {version!r}")
    return parts + [0] * (3 - len(parts))


def next_major(version: str) -> str:
    """1.0.0 for any 0.x, else the next major."""
    return f"{_release(version)[0] + 1}.0.0"


def next_minor(version: str) -> str:
    major, minor, _ = _release(version)
    return f"{major}.{minor + 1}.0"


def add_changelog_entry(text: str, version: str, date: str, bullets: list[str]) -> str:
    """Add ``## version - date`` with ``bullets`` above the newest entry.

    An ``## Unreleased`` section's items are released with this version (the new heading goes under
    it); an existing heading for ``version`` receives the bullets at its top.
    """
    items = "".join(f"- {b}\n" for b in bullets)
    headings = list(_HEADING.finditer(text))
    same = next((h for h in headings if h.group(1) == version), None)
    if same or (headings and headings[0].group(1).lower() == "unreleased"):
        anchor = same or headings[0]
        head, rest = text[: anchor.end()] + "\n", text[anchor.end() :].lstrip("\n")
        new_heading = "" if same else f"\n## {version} - {date}\n"
        gap = "\n" if rest.startswith("#") or not rest else ""
        return head + new_heading + "\n" + items + gap + rest
    entry = f"## {version} - {date}\n\n{items}"
    if headings:
        return text[: headings[0].start()] + entry + "\n" + text[headings[0].start() :]
    return text.rstrip("\n") + "\n\n" + entry


def docs_status(text: str) -> str | None:
    """The ``status:`` of a docs page's front matter, or None."""
    m = _FRONT_MATTER.match(text)
    s = re.search(r"^status\s*:\s*(\S+)", m.group(1) or "", re.M) if m else None
    return s.group(1) if s else None


def set_docs_status(text: str, status: str) -> str:
    """Set ``status:`` in the front matter (creating the front matter when the page has none)."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return f"---\nstatus: {status}\n---\n\n{text}"
    body = m.group(1) or ""
    if re.search(r"^status\s*:", body, re.M):
        body = re.sub(r"^status\s*:.*$", f"status: {status}", body, count=1, flags=re.M)
    else:
        body += f"status: {status}\n"
    return f"---\n{body}---\n" + text[m.end() :]


def method_nav(docs_dir: str | Path, subdir: str = "methods") -> list[dict]:
    """mkdocs nav sections for ``docs_dir/subdir/*.md`` grouped by their front-matter ``status``.

    ``[{"Stable": ["methods/dpo.md", ...]}, {"Experimental": [...]}, ...]``, empty sections left out;
    a page without a status counts as experimental; ``index.md`` (the section's overview) is left to
    the caller. For an mkdocs hook (see docs/lifecycle.md).
    """
    sections: dict[str, list[str]] = {s: [] for s in DOCS_STATUSES}
    for page in sorted(p for p in Path(docs_dir, subdir).glob("*.md") if p.name != "index.md"):
        status = docs_status(page.read_text(encoding="utf-8")) or "experimental"
        sections.setdefault(status, []).append(f"{subdir}/{page.name}")
    return [{s.capitalize(): pages} for s, pages in sections.items() if pages]


# -- plans: what a command changes ----------------------------------------------------------------------


@dataclass
class Change:
    """One file a command writes: its text before (None for a new file) and after."""

    path: Path
    before: str | None
    after: str
    what: str

    def diff(self, root: Path) -> str:
        name = display_path(self.path, root)
        return "".join(
            difflib.unified_diff(
                (self.before or "").splitlines(True),
                self.after.splitlines(True),
                f"a/{name}" if self.before is not None else "/dev/null",
                f"b/{name}",
            )
        )


def apply(changes: list[Change]) -> None:
    """Write every change: all temporary files first, then one rename each."""
    staged = []
    for c in changes:
        c.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = c.path.with_name(f".{c.path.name}.posttrain-tmp")
        tmp.write_text(c.after, encoding="utf-8")
        staged.append((tmp, c.path))
    for tmp, path in staged:
        os.replace(tmp, path)


def _check_pyproject(text: str, level: int, version: str) -> None:
    project = _parse_toml(text, Path("pyproject.toml (rewritten)"))["project"]
    statuses = [c for c in project.get("classifiers", []) if c.startswith("Development Status")]
    if statuses != [f"Development Status :: {STATUS[level]}"] or project.get("version") != version:
        raise PosttrainError(
            f"rewriting pyproject.toml went wrong (classifiers {statuses}, version "
            f"{project.get('version')!r}); nothing was changed. Edit it by hand."
        )


def _record(pkg: Package, event: dict) -> list[Change]:
    json_path, md_path = pkg.root / RECORD_JSON, pkg.root / RECORD_MD
    before_json = json_path.read_text(encoding="utf-8") if json_path.is_file() else None
    events = json.loads(before_json).get("events", []) if before_json else []
    record = {"distribution": pkg.distribution, "names": pkg.names, "events": [*events, event]}
    md_before = md_path.read_text(encoding="utf-8") if md_path.is_file() else None
    return [
        Change(json_path, before_json, json.dumps(record, indent=2) + "\n", f"{RECORD_JSON}: the record, as data"),
        Change(md_path, md_before, render_record(record), f"{RECORD_MD}: the record, to read"),
    ]


_VERBS = {"promote": "promoted to stable", "demote": "demoted (deprecated)", "retire": "retired"}


def render_record(record: dict) -> str:
    """PROMOTION.md: every status change of the package, newest first."""
    lines = [
        f"# Status record of {record['distribution']}",
        "",
        f"Written by `posttrain promote` and `posttrain demote`; the same data is in {RECORD_JSON}. Newest first.",
        "",
    ]
    for e in reversed(record["events"]):
        lines += [
            f"## {e['version']['to']}: {_VERBS[e['action']]} ({e['date']})",
            "",
            f"From {e['version']['from']} (`Development Status :: {e['status']['from']}`) to "
            f"{e['version']['to']} (`Development Status :: {e['status']['to']}`), docs section "
            f"`{e['docs_status']['to']}`; posttrain {e['posttrain']}.",
            "",
        ]
        if e.get("note"):
            lines += [f"Note: {e['note']}", ""]
        if e.get("criteria"):
            lines += ["| criterion | result | evidence |", "|---|---|---|"]
            lines += [
                f"| {c['title']} | {'passed' if c['passed'] else 'FAILED'} | {c['detail'].replace('|', '/')} |"
                for c in e["criteria"]
            ]
            lines.append("")
    return "\n".join(lines)


def verify_record(root: str | Path) -> list[str]:
    """What is wrong with a package's promotion record, judged by today's rules for what a promotion needs.

    Each promote event must list every criterion as passed, its conformance evidence must show every check
    of the kit at that time passed or a declared xfail, and its parity evidence must be a complete
    ``posttrain.result/1`` result whose figures give the recorded statistic within its tolerance (the source
    hash is the one promoted; the source may have changed since, in later releases).
    """
    from posttrain.testing.parity import result_problems

    path = Path(root) / RECORD_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: cannot read the record ({exc})"]
    problems = []
    for i, event in enumerate(record.get("events", [])):
        if event.get("action") != "promote":
            continue
        where = f"{path.name} event {i} ({event.get('version', {}).get('to')})"
        criteria = {c.get("name"): c for c in event.get("criteria", [])}
        for name in ("tests", "docs", "parity", "changelog", "conformance"):
            if name not in criteria:
                problems.append(f"{where}: criterion {name!r} is not recorded")
            elif not criteria[name].get("passed"):
                problems.append(f"{where}: criterion {name!r} did not pass")
        parity = criteria.get("parity", {}).get("evidence", {})
        problems += [f"{where}: parity evidence: {p}" for p in result_problems(parity)]
        if not (parity.get("source") or {}).get("hash"):
            problems.append(f"{where}: parity evidence records no source hash")
        suites = criteria.get("conformance", {}).get("evidence", {}).get("suites", {})
        if not suites:
            problems.append(f"{where}: conformance evidence lists no kit suite")
        for suite, found in suites.items():
            bad = {k: v for k, v in found.get("checks", {}).items() if v not in ("passed", "xfailed")}
            if bad:
                problems.append(f"{where}: {suite} checks not green: {bad}")
    return problems


def plan(
    pkg: Package,
    action: str,
    page: Path | None,
    criteria: list[Criterion] | None = None,
    note: str | None = None,
    date: str | None = None,
) -> list[Change]:
    """The changes of ``action`` ("promote", "demote" or "retire"): pyproject, changelog, docs page, record."""
    date = date or datetime.date.today().isoformat()
    level = {"promote": STABLE, "demote": DEMOTED, "retire": RETIRED}[action]
    version = next_major(pkg.version) if action == "promote" else next_minor(pkg.version)
    docs_to = {"promote": "stable", "demote": "deprecated", "retire": "retired"}[action]
    old = STATUS.get(pkg.level or 0, "none")
    text = set_version(set_classifier(pkg.text, level), version)
    _check_pyproject(text, level, version)
    changes = [
        Change(
            pkg.root / "pyproject.toml",
            pkg.text,
            text,
            f"pyproject.toml: Development Status {old} -> {STATUS[level]}, version {pkg.version} -> {version}",
        )
    ]
    bullet = {
        "promote": f"Promoted to stable (`Development Status :: {STATUS[STABLE]}`): from this release the method "
        f"follows semantic versioning; {RECORD_MD} lists the promotion criteria it met.",
        "demote": f"Deprecated (`Development Status :: {STATUS[DEMOTED]}`): the method is experimental again and "
        "warns when used; it may change or be removed in a later release.",
        "retire": f"Retired (`Development Status :: {STATUS[RETIRED]}`): `posttrain list` hides the method and "
        "training with it needs `--allow_inactive true`.",
    }[action]
    log = pkg.root / "CHANGELOG.md"
    log_before = log.read_text(encoding="utf-8") if log.is_file() else None
    extra = [note if action == "promote" else f"Reason: {note}"] if note else []
    log_after = add_changelog_entry(log_before or "# Changelog\n", version, date, [bullet, *extra])
    changes.append(Change(log, log_before, log_after, f"CHANGELOG.md: entry {version}"))
    docs_from = None
    if page is not None:
        page_text = page.read_text(encoding="utf-8")
        docs_from = docs_status(page_text)
        changes.append(
            Change(
                page,
                page_text,
                set_docs_status(page_text, docs_to),
                f"{display_path(page, pkg.root)}: status {docs_from or '(none)'} -> {docs_to}",
            )
        )
    from posttrain._discovery import core_version

    event = {
        "action": action,
        "date": date,
        "version": {"from": pkg.version, "to": version},
        "status": {"from": old, "to": STATUS[level]},
        "docs_status": {"from": docs_from, "to": docs_to},
        "docs_page": display_path(page, pkg.root) if page else None,
        "posttrain": core_version(),
        "note": note or "",
    }
    if criteria is not None:
        event["criteria"] = [asdict(c) for c in criteria]
    return changes + _record(pkg, event)
