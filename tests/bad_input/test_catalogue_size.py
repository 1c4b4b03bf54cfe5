"""The catalogue stays large and organised: at least 100 cases, each file one class of failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CLASSES = {
    "test_untrusted_files.py": "nothing executed from files a user did not write",
    "test_preemption_and_disk.py": "nothing lost: signals, kill -9, failing writes, NaN",
    "test_run_directory.py": "nothing lost: output directory, lock, overwrite, resume rules",
    "test_configuration.py": "configuration and options that would be ignored",
    "test_models.py": "models and tokenizers",
    "test_plugins.py": "plugins and operator lists",
    "test_data_files.py": "dataset files and rows",
}


def test_catalogue_has_at_least_100_cases():
    assert sorted(p.name for p in HERE.glob("test_*.py") if p.name != Path(__file__).name) == sorted(CLASSES)
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *map(str, CLASSES)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    assert len(ids) == len(set(ids)) >= 100, listed.stdout[-2000:] + listed.stderr[-2000:]
