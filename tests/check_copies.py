"""Check `# Copied from package.module.function [with a->b, c->d]` markers (run by `nox -s copies`).

A copied function, class or method (``pkg.module.Class.method``) must stay identical to its source
after the listed name substitutions; a drifted copy is reported with a diff. Sync the copy, or
remove the marker and own the change.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(\s*)# Copied from ([\w.]+)(?: with (.+))?$")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def source_roots() -> dict[str, Path]:
    roots = {"posttrain": ROOT / "core" / "src" / "posttrain"}
    for src in ROOT.glob("plugins/*/src/*"):
        if src.is_dir():
            roots[src.name] = src
    return roots


def definition(path: Path, qualname: str) -> str | None:
    """Source of ``qualname`` (``func`` or ``Class.method``) in ``path``, dedented, decorators excluded."""
    text = path.read_text()
    scope: list[ast.stmt] = ast.parse(text).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, DEFS) and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    segment = ast.get_source_segment(text, node)
    return textwrap.dedent(" " * node.col_offset + segment) if segment else None


def resolve(dotted: str, roots: dict[str, Path]) -> tuple[Path, str] | None:
    """``pkg.module.Class.method`` -> (pkg/module.py, "Class.method"), longest module path first."""
    parts = dotted.split(".")
    root = roots.get(parts[0])
    if root is None:
        return None
    for cut in range(len(parts) - 1, 1, -1):
        module = root.joinpath(*parts[1:cut]).with_suffix(".py")
        if module.is_file():
            return module, ".".join(parts[cut:])
    return None


def marked_definition(path: Path, marker_line: int) -> str | None:
    """Qualified name of the definition that follows the marker (decorators and comments may sit between)."""
    lines = path.read_text().splitlines()

    def visit(body: list[ast.stmt], prefix: str) -> str | None:
        for n in body:
            if not isinstance(n, DEFS):
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

    return visit(ast.parse(path.read_text()).body, "")


def main() -> int:
    roots, problems, checked = source_roots(), [], 0
    for path in sorted(list(ROOT.glob("plugins/*/src/**/*.py")) + list(ROOT.glob("core/src/**/*.py"))):
        for i, line in enumerate(path.read_text().splitlines()):
            m = MARKER.match(line)
            if not m:
                continue
            checked += 1
            target = resolve(m.group(2), roots)
            original = definition(*target) if target else None
            if original is None:
                problems.append(f"{path}:{i + 1}: cannot find the source {m.group(2)}")
                continue
            qualname = marked_definition(path, i + 1)
            copy = definition(path, qualname) if qualname else None
            if copy is None:
                problems.append(f"{path}:{i + 1}: no definition follows the marker for {m.group(2)}")
                continue
            for pair in (m.group(3) or "").split(","):
                if "->" in pair:
                    a, b = (s.strip() for s in pair.split("->"))
                    original = original.replace(a, b)
            if original.strip() != copy.strip():
                diff = "\n".join(
                    difflib.unified_diff(original.splitlines(), copy.splitlines(), "source", "copy", lineterm="")
                )
                problems.append(f"{path}:{i + 1}: copy of {m.group(2)} has drifted:\n{diff}")
    for p in problems:
        print(p)
    print(f"{checked} copy markers checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
