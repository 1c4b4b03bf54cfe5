"""Check `# Copied from package.module.function [with a->b, c->d]` markers (run by `nox -s copies`).

A copied function or class must stay identical to its source after the listed name substitutions;
a drifted copy is reported with a diff. Sync the copy, or remove the marker and own the change.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(\s*)# Copied from ([\w.]+)(?: with (.+))?$")


def source_roots() -> dict[str, Path]:
    roots = {"posttrain": ROOT / "core" / "src" / "posttrain"}
    for src in ROOT.glob("plugins/*/src/*"):
        if src.is_dir():
            roots[src.name] = src
    return roots


def definition(path: Path, name: str) -> str | None:
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(text, node)
    return None


def resolve(dotted: str, roots: dict[str, Path]) -> tuple[Path, str] | None:
    parts = dotted.split(".")
    root = roots.get(parts[0])
    if root is None:
        return None
    module = root.joinpath(*parts[1:-1]).with_suffix(".py")
    return (module, parts[-1]) if module.is_file() else None


def main() -> int:
    roots, problems, checked = source_roots(), [], 0
    for path in sorted(list(ROOT.glob("plugins/*/src/**/*.py")) + list(ROOT.glob("core/src/**/*.py"))):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = MARKER.match(line)
            if not m:
                continue
            checked += 1
            target = resolve(m.group(2), roots)
            if target is None:
                problems.append(f"{path}:{i + 1}: cannot find the source {m.group(2)}")
                continue
            original = definition(*target)
            following = "\n".join(lines[i + 1 :])
            name_match = re.match(r"\s*(?:async\s+def|def|class)\s+(\w+)", following)
            copy = definition(path, name_match.group(1)) if name_match else None
            if original is None or copy is None:
                problems.append(f"{path}:{i + 1}: no definition found for {m.group(2)}")
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
