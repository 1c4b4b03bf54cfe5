"""The plugin index: which package provides which method, reward, environment or command.

One JSON file (``plugin_index.json`` beside this module) lists the official packages of this
repository and known third-party ones. It answers "what do I install to get method X" for
``posttrain install`` and for the "not installed" errors of every command, and it is the source
of the plugin directory page of the docs (``docs/hooks/plugin_directory.py`` writes that page and
refreshes the official entries from ``plugins/*/pyproject.toml``).

Standard library only: it runs on the ``posttrain info`` and error paths, which must stay fast.
``POSTTRAIN_PLUGIN_INDEX=/path/to/index.json`` replaces the built-in index (an organisation's own
list, or a test's).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

INDEX_FILE = Path(__file__).with_name("plugin_index.json")
PROVIDES = ("methods", "rewards", "environments", "commands")
KIND_FIELD = {"method": "methods", "reward": "rewards", "environment": "environments", "command": "commands"}


def normalize(name: str) -> str:
    """PEP 503 normal form of a distribution name (``Posttrain_DPO`` -> ``posttrain-dpo``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def index_path() -> Path:
    override = os.environ.get("POSTTRAIN_PLUGIN_INDEX", "").strip()
    return Path(override) if override else INDEX_FILE


def load() -> list[dict]:
    """The index's package entries; an unreadable override is a PosttrainError naming the file."""
    path = index_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        from posttrain._errors import PosttrainError

        raise PosttrainError(
            f"cannot read the plugin index {path}: {exc}. It must be a JSON file like the built-in "
            f"{INDEX_FILE.name}; fix it or unset POSTTRAIN_PLUGIN_INDEX."
        ) from None
    return list(data.get("packages", []))


def find_package(package: str) -> dict | None:
    wanted = normalize(package)
    return next((p for p in load() if normalize(p["package"]) == wanted), None)


def providers(kind: str, name: str) -> list[dict]:
    """Index entries whose package provides ``name`` as a ``kind``; official packages first."""
    field = KIND_FIELD.get(kind)
    if field is None:
        return []
    found = [p for p in load() if name in p.get(field, [])]
    return sorted(found, key=lambda p: (p.get("origin") != "official", p["package"]))


def lookup(name: str) -> dict | None:
    """The package an install name means: a package name, its short form (``dpo`` for posttrain-dpo),
    or a method, reward, environment or command it provides. Official packages win ties."""
    entries = load()
    wanted = normalize(name)
    for p in entries:
        if normalize(p["package"]) in (wanted, f"posttrain-{wanted}"):
            return p
    for kind in KIND_FIELD:
        found = providers(kind, name)
        if found:
            return found[0]
    return None


def install_name(entry: dict) -> str:
    """What to type after ``posttrain install`` for an index entry (the short form for official packages)."""
    package = entry["package"]
    if entry.get("origin") == "official" and package.startswith("posttrain-"):
        return package[len("posttrain-") :]
    return package


def not_installed_message(kind: str, name: str) -> str | None:
    """ "method 'dpo' is not installed; it is provided by posttrain-dpo: run `posttrain install dpo`." or None
    when the index does not know ``name`` (or the providing package is installed after all)."""
    from importlib import metadata

    try:
        found = providers(kind, name)
    except Exception:  # a broken index must not hide the real error
        return None
    if not found:
        return None
    entry = found[0]
    try:
        metadata.distribution(entry["package"])
        return None  # installed, so something else hides the name (an operator list, a broken install)
    except metadata.PackageNotFoundError:
        pass
    origin = "" if entry.get("origin") == "official" else " (a third-party package)"
    others = [p["package"] for p in found[1:]]
    also = f" It is also provided by {', '.join(others)}." if others else ""
    return (
        f"{kind} {name!r} is not installed; it is provided by {entry['package']}{origin}: "
        f"run `posttrain install {install_name(entry)}`.{also}"
    )
