"""Load a plugin's test modules outside pytest, for the calibration scripts next to this file.

pytest imports every ``conftest.py`` and test file by path (``--import-mode=importlib``), so they are not importable
by name; ``load`` does the same, under a name unique to the plugin.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(plugin: str, module: str):
    """``plugins/posttrain-PLUGIN/tests/MODULE.py`` as a module (cached)."""
    name = f"_calibration_{plugin}_{module}"
    if name not in sys.modules:
        path = ROOT / "plugins" / f"posttrain-{plugin}" / "tests" / f"{module}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def seeds(text: str) -> list[int]:
    """``"0-4"`` or ``"0,3,7"`` -> a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]
