"""Developer sessions. `nox -s tests` is what CI runs; the others are opt-in.

nox -s tests               # the whole suite: core + every plugin, installed together
nox -s "plugin(name='posttrain-dpo')"   # core + one plugin alone (catches hidden dependencies)
nox -s lint                # ruff check + format check
nox -s docs                # mkdocs build --strict
nox -s copies              # "# Copied from" markers still match their source (python -m posttrain.testing.copies)
nox -s parity              # per-method comparison against TRL 1.16 (installs trl; not in CI)
nox -s bench               # speed/memory against TRL and a bare PyTorch loop (not in CI)
nox -s demo                # the end-to-end demo
nox -s build               # wheel + sdist of core and every plugin into dist/, then twine check --strict
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ["-c", str(ROOT / "constraints.txt")]
PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())
CORE_EXTRAS = "core[peft,plot,tensorboard,vision]"
# a plugin's extras that its tests need (the libraries it drives); pinned in constraints.txt
PLUGIN_EXTRAS = {"posttrain-trackers": "[all]"}

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def install_all(session: nox.Session, *extra: str) -> None:
    plugins = [f"-eplugins/{p}{PLUGIN_EXTRAS.get(p, '')}" for p in PLUGINS]
    # not silent: pip's "Collecting ..." lines are the progress of a several-minute install (CI logs, no terminal)
    session.install(*CONSTRAINTS, "--progress-bar", "off", "-e", CORE_EXTRAS, *plugins, "pytest", *extra, silent=False)


@nox.session
def tests(session: nox.Session) -> None:
    """Core and all plugins together; pytest's exit code 5 (no tests collected) fails the session."""
    # setuptools>=77 builds sdists and scaffolded packages (SPDX license) without build isolation in the tests;
    # jsonschema validates the shipped configs against their schemas; deepspeed runs the ZeRO-2/3 tests
    # (tests/test_deepspeed.py, skipped where it is missing)
    install_all(session, "pytest-xdist", "ruff==0.17.6", "setuptools>=77", "jsonschema", "deepspeed")
    # two workers with one torch thread each beat one worker with two threads on tiny models
    session.run(
        "python", "-m", "pytest", "-n", "2", "--dist", "loadgroup", *session.posargs, env={"OMP_NUM_THREADS": "1"}
    )


@nox.session
@nox.parametrize("name", PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    """One plugin installed alone with core: a hidden dependency on another plugin fails here."""
    session.install(*CONSTRAINTS, "-e", CORE_EXTRAS, f"-eplugins/{name}{PLUGIN_EXTRAS.get(name, '')}", "pytest")
    others = [p for p in PLUGINS if p != name]
    installed = session.run("python", "-m", "pip", "list", "--format=json", silent=True)
    leaked = sorted({d["name"] for d in json.loads(installed)} & set(others))
    if leaked:
        session.run("python", "-m", "pip", "uninstall", "-y", *leaked)
    session.run("python", "-m", "pytest", f"plugins/{name}", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    # mkdocstrings renders docs/api.md from core/src by static analysis (griffe): core need not be installed
    session.install("mkdocs-material==9.8.2", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))


@nox.session(python=False)
def copies(session: nox.Session) -> None:
    """Every `# Copied from pkg.module.func` marker matches its source (names substituted with `with a->b`)."""
    session.run("python", str(ROOT / "tests" / "check_copies.py"))


@nox.session
def parity(session: nox.Session) -> None:
    """Each plugin's parity script against TRL 1.16; one table in benchmarks/results/parity.md (posargs: plugins)."""
    install_all(session, "trl==1.16.0")
    session.run("python", str(ROOT / "benchmarks" / "parity.py"), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed, memory and start-up against TRL 1.16 and a bare PyTorch loop (see benchmarks/README.md)."""
    install_all(session, "trl==1.16.0")
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    install_all(session)
    session.run("posttrain", "demo", *session.posargs)


@nox.session
def build(session: nox.Session) -> None:
    """A wheel and an sdist for core and every plugin in dist/, each built in isolation as an index would,
    then `twine check --strict` on all of them (fails on any warning, e.g. a missing long description)."""
    session.install("build==1.6.1", "twine==7.0.0")
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)
    for package in ["core", *[f"plugins/{p}" for p in PLUGINS]]:
        session.run("python", "-m", "build", "--outdir", str(out), str(ROOT / package))
    session.run("twine", "check", "--strict", *sorted(str(p) for p in out.iterdir()))
