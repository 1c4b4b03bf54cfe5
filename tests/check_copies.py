"""Check this repository's `# Copied from ...` markers (run by `nox -s copies` and tests/test_copies.py).

The checker is core's ``python -m posttrain.testing.copies``, the one third-party packages use; here it
scans core and every plugin, and finds sources in the plugins' source trees before installed copies.
"""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.testing.copies import main as check

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    sources = sorted(str(p) for p in ROOT.glob("plugins/*/src") if p.is_dir())
    roots = [arg for src in [str(ROOT / "core" / "src"), *sources] for arg in ("--source-root", src)]
    return check([str(ROOT / "core" / "src"), *sources, *roots])


if __name__ == "__main__":
    sys.exit(main())
