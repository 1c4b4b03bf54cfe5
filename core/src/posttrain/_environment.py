"""Environment summary for ``posttrain env`` and for every run's provenance record."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "datasets", "accelerate", "peft", "pluggy", "vllm", "trl", "deepspeed")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: str | Path = ".") -> str | None:
    """The commit of the git work tree holding ``path`` (with ``-dirty``), or None."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def accelerator_info() -> dict[str, Any]:
    """CUDA/accelerator facts; imports torch only if it is installed."""
    try:
        import torch
    except ImportError:
        return {"torch": "not installed"}
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        info["mps_available"] = True
    return info


def summary(with_hardware: bool = True) -> dict[str, Any]:
    from posttrain import _discovery as discovery

    env: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "posttrain": discovery.core_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "plugins": [
            {"name": e.name, "kind": e.kind, "package": e.package, "version": e.version, "status": e.status}
            for e in discovery.discover()
        ],
    }
    import os

    env["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    if with_hardware:
        env["accelerator"] = accelerator_info()
    return env


def provenance(method_entry: Any, reward_entries: list[Any]) -> dict[str, Any]:
    """What a run used: its plugins (name/version/status), core, environment, git commit."""
    from posttrain import _discovery as discovery

    used = [method_entry, *reward_entries]
    return {
        "posttrain": discovery.core_version(),
        "plugins_used": [
            {"name": e.name, "kind": e.kind, "package": e.package, "version": e.version, "status": e.declared_status}
            for e in used
            if e is not None
        ],
        "git_commit": git_commit(),
        "command": sys.argv,
        "environment": summary(with_hardware=True),
    }


def entry_for_method(method: Any) -> Any:
    """The installed ``posttrain.methods`` entry that provides ``method`` (an instance or class), or None
    for a method defined in a script, a test or a notebook."""
    from posttrain import _discovery as discovery

    cls = method if isinstance(method, type) else type(method)
    package = cls.__module__.split(".")[0]
    for entry in discovery.discover(("method",)):
        if entry.name == getattr(cls, "name", None) and entry.value.split(":")[0].split(".")[0] == package:
            return entry
    return None


def environment_entries(config: Any) -> list[Any]:
    """The installed entry of the run's ``environment`` (none without one, or for a hook-registered one)."""
    from posttrain import _discovery as discovery

    name = getattr(config, "environment", None)
    if not name:
        return []
    package, _, plain = name.rpartition(":")
    norm = package.replace("_", "-").lower()
    found = discovery.discover(("environment",))
    return [e for e in found if e.name == plain and (not package or e.package.replace("_", "-").lower() == norm)]


def provenance_for(method: Any, reward_names: list[str], config: Any = None) -> dict[str, Any]:
    """Provenance of a run started through the Python API, with the same experimental warning as the CLI."""
    from posttrain import _discovery as discovery

    entry = entry_for_method(method)
    if entry is not None:
        discovery.warn_if_experimental(entry)
    rewards = [e for e in discovery.discover(("reward",)) if e.name in reward_names]
    return provenance(entry, rewards + environment_entries(config))
