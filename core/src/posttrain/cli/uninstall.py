"""``posttrain uninstall NAME...``: remove plugin packages from this environment with pip.

NAME is a package, its short form (``dpo`` for posttrain-dpo) or a method, reward or command an
installed package provides. The core and distributions that are not posttrain plugins are refused:
removing them is a job for pip itself.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from posttrain import _discovery as discovery
from posttrain._errors import PluginError, PosttrainError
from posttrain.cli import install, plugin_index


def _provides_posttrain(dist: metadata.Distribution) -> bool:
    try:
        return any(ep.group.startswith("posttrain.") for ep in dist.entry_points)
    except Exception:
        return False


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def resolve_uninstall(name: str) -> str:
    """The installed distribution NAME means: itself, posttrain-NAME, or the package providing NAME."""
    if plugin_index.normalize(name) == "posttrain":
        raise PluginError(
            "'posttrain' is the core; `posttrain uninstall` removes plugin packages only (removing the core removes "
            "this command too). Use `pip uninstall posttrain` if that is what you want."
        )
    dist = _installed(name) or (None if "posttrain" in name.lower() else _installed(f"posttrain-{name}"))
    if dist is not None:
        package = dist.metadata["Name"]
        if not _provides_posttrain(dist):
            raise PluginError(
                f"{package} is installed but is not a posttrain plugin (it declares no posttrain.* entry points), "
                f"so `posttrain uninstall` leaves it alone. Use `pip uninstall {package}` if you mean it."
            )
        return package
    providers = sorted({e.package for e in discovery.discover(tuple(discovery.GROUPS)) if e.name == name})
    if len(providers) == 1:
        return providers[0]
    if len(providers) > 1:
        raise PluginError(
            f"{name!r} is provided by {' and '.join(providers)}; name the package to remove "
            f"(`posttrain uninstall {providers[0]}`)."
        )
    raise PluginError(
        f"{name!r} is not installed: no installed package is called {name} or posttrain-{name}, and none provides "
        "a method, reward or command of that name. `posttrain list` shows what is installed."
    )


def uninstall(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain uninstall",
        description="Uninstall plugin packages from this environment with pip. NAME is a package, its short form "
        "(dpo for posttrain-dpo) or a method, reward or command an installed package provides.",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true", help="show which packages would be removed; stop")
    args = p.parse_args(argv)
    packages = list(dict.fromkeys(resolve_uninstall(n) for n in args.names))
    for package in packages:
        provided = [e for e in discovery.discover(tuple(discovery.GROUPS)) if e.package == package]
        what = ", ".join(f"{e.kind} {e.name}" for e in provided) or "no usable entries"
        print(f"{package} {metadata.version(package)}: {what}", file=sys.stderr)
    if args.dry_run:
        print(" ".join([sys.executable, "-m", "pip", "uninstall", *(["-y"] if args.yes else []), *packages]))
        return 0
    if not args.yes and not sys.stdin.isatty():
        raise PosttrainError(
            f"uninstalling {', '.join(packages)} asks for confirmation, but stdin is not a terminal; "
            "pass --yes to confirm on the command line."
        )
    install._require_pip()
    code, _ = install.run_pip(["uninstall", *(["-y"] if args.yes else []), *packages], quiet=False, capture=args.yes)
    if code != 0:
        raise PosttrainError(
            f"pip failed (exit code {code}) uninstalling {', '.join(packages)}; its messages are above."
        )
    still = [p for p in packages if _installed(p) is not None]
    if still:  # pip asked and the answer was no
        print(f"kept {', '.join(still)}", file=sys.stderr)
        return 1
    for package in packages:
        print(f"uninstalled {package}")
    return 0


def run(command: str, argv: list[str]) -> int:
    return uninstall(argv)
