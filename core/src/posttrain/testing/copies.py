"""Check ``# Copied from package.module.function [with a->b, c->d]`` markers: ``python -m posttrain.testing.copies``.

Method logic copied from another plugin is fine when it says so: the line above the copied function,
class or method (``pkg.module.Class.method``) names its source, and the copy must stay identical to that
source after the listed name substitutions. A drifted copy is reported with a diff; sync the copy, or
remove the marker and own the change.

Sources are looked up first in the ``--source-root`` trees given (a repository's ``plugins/*/src``), then
among the installed packages, so a third-party package checks its copies of ``posttrain_dpo`` against
the installed posttrain-dpo::

    python -m posttrain.testing.copies src/            # exit 1 and a diff per drifted copy

Nothing is imported: files are read and parsed, and installed packages are found by their location.

.. versionadded:: 1.0
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["MARKER", "check_copies", "main"]

MARKER = re.compile(r"^(\s*)# Copied from ([\w.]+)(?: with (.+))?$")
"""A copy marker line: its indentation, the dotted source (``pkg.module.Qualname``) and the substitutions.

.. versionadded:: 1.0
"""
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _definition(path: Path, qualname: str) -> str | None:
    """Source of ``qualname`` (``func`` or ``Class.method``) in ``path``, dedented, decorators excluded."""
    text = path.read_text(encoding="utf-8")
    scope: list[ast.stmt] = ast.parse(text).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, _DEFS) and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    segment = ast.get_source_segment(text, node)
    return textwrap.dedent(" " * node.col_offset + segment) if segment else None


def _package_dir(top: str, roots: dict[str, Path]) -> Path | None:
    """The directory of top-level package ``top``: a given source root, else the installed one (not imported)."""
    if top in roots:
        return roots[top]
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finding it imports nothing
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _resolve(dotted: str, roots: dict[str, Path]) -> tuple[Path, str] | None:
    """``pkg.module.Class.method`` -> (pkg/module.py, "Class.method"), longest module path first."""
    parts = dotted.split(".")
    root = _package_dir(parts[0], roots)
    if root is None:
        return None
    for cut in range(len(parts) - 1, 1, -1):
        module = root.joinpath(*parts[1:cut]).with_suffix(".py")
        if module.is_file():
            return module, ".".join(parts[cut:])
    return None


def _marked_definition(path: Path, marker_line: int) -> str | None:
    """Qualified name of the definition that follows the marker (decorators and comments may sit between)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()

    def visit(body: list[ast.stmt], prefix: str) -> str | None:
        for n in body:
            if not isinstance(n, _DEFS):
                continue
            first = min([n.lineno] + [d.lineno for d in n.decorator_list])
            between = lines[marker_line : first - 1]
            if first > marker_line and all(not x.strip() or x.strip().startswith("#") for x in between):
                return prefix + n.name
            if isinstance(n, ast.ClassDef) and n.lineno < marker_line <= (n.end_lineno or n.lineno):
                found = visit(n.body, prefix + n.name + ".")
                if found:
                    return found
        return None

    return visit(ast.parse(text).body, "")


def _python_files(paths: Iterable[Path]) -> list[Path]:
    out = []
    for path in paths:
        found = [path] if path.is_file() else path.rglob("*.py")
        out += [p for p in found if "__pycache__" not in p.parts and not any(x.endswith(".egg-info") for x in p.parts)]
    return sorted(set(out))


def check_copies(paths: Sequence[str | Path], source_roots: Sequence[str | Path] = ()) -> tuple[int, list[str]]:
    """(markers checked, problems) for every marker in the Python files under ``paths``.

    Args:
        paths: files or directories to scan for markers.
        source_roots: directories holding top-level packages (``plugins/posttrain-dpo/src``) where sources are
            looked up before the installed packages.

    .. versionadded:: 1.0
    """
    roots: dict[str, Path] = {}
    for root in map(Path, source_roots):
        for package in root.iterdir() if root.is_dir() else ():
            if package.is_dir() and (package / "__init__.py").is_file():
                roots.setdefault(package.name, package)
    problems, checked = [], 0
    for path in _python_files(map(Path, paths)):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            m = MARKER.match(line)
            if not m:
                continue
            checked += 1
            target = _resolve(m.group(2), roots)
            original = _definition(*target) if target else None
            if original is None:
                problems.append(
                    f"{path}:{i + 1}: cannot find the source {m.group(2)}: install the package it names, or fix the "
                    "dotted path (package.module.function)"
                )
                continue
            qualname = _marked_definition(path, i + 1)
            copy = _definition(path, qualname) if qualname else None
            if copy is None:
                problems.append(f"{path}:{i + 1}: no function or class follows the marker for {m.group(2)}")
                continue
            for pair in (m.group(3) or "").split(","):
                if "->" in pair:
                    a, b = (s.strip() for s in pair.split("->"))
                    original = original.replace(a, b)
            if original.strip() != copy.strip():
                diff = "\n".join(
                    difflib.unified_diff(original.splitlines(), copy.splitlines(), "source", "copy", lineterm="")
                )
                problems.append(
                    f"{path}:{i + 1}: copy of {m.group(2)} has drifted (sync it, or remove the marker and own the "
                    f"change):\n{diff}"
                )
    return checked, problems


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print each problem and a summary; exit 1 when a copy drifted or a source is missing.

    .. versionadded:: 1.0
    """
    parser = argparse.ArgumentParser(
        prog="python -m posttrain.testing.copies",
        description="Check that '# Copied from pkg.module.func [with a->b]' copies still match their source.",
    )
    parser.add_argument("paths", nargs="*", default=["src"], help="files or directories to scan (default: src)")
    parser.add_argument(
        "--source-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of top-level packages to find sources in before the installed ones (repeatable)",
    )
    args = parser.parse_args(argv)
    checked, problems = check_copies(args.paths, args.source_root)
    for p in problems:
        print(p)
    print(f"{checked} copy markers checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
