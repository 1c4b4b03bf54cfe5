"""``posttrain install NAME...``: plugin packages into this environment (``posttrain uninstall`` removes them).

It runs ``sys.executable -m pip``, so packages land in the environment ``posttrain`` runs from. A
NAME is a package (``posttrain-dpo``), its short form (``dpo``), a method, reward or command the
plugin index knows (``accuracy`` -> posttrain-rewards), a local path (directory, wheel, sdist) or a
URL. The core is never changed: pip runs with a constraint pinning the installed ``posttrain``
version, so a package that needs another core is refused instead of silently upgrading it.

When the core was installed from a source checkout (editable or not), official packages install from
that checkout's ``plugins/`` folder -- the same commit as the core, and the only place they exist
until they are published -- unless ``--index`` is given or the name carries a version specifier.
``POSTTRAIN_CHECKOUT=/path/to/posttrain`` names the checkout explicitly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from posttrain import _discovery as discovery
from posttrain._errors import PluginError, PosttrainError
from posttrain.cli import plugin_index

URL_RE = re.compile(r"^(git\+|hg\+|svn\+|bzr\+)?[a-z][a-z0-9+.-]*://", re.IGNORECASE)
REQUIREMENT_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
ARCHIVES = (".whl", ".tar.gz", ".zip", ".tar.bz2")


@dataclass
class Target:
    """One NAME resolved to what pip is given."""

    name: str  # as typed
    pip_args: list[str]  # e.g. ["posttrain-dpo"] or ["-e", "/repo/plugins/posttrain-dpo"]
    package: str | None  # distribution name when known before installing
    source: str  # "checkout", "path", "url" or "index"

    def describe(self) -> str:
        where = {
            "checkout": "from the source checkout",
            "path": "from a local path",
            "url": "from a URL",
            "index": "from the package index",
        }[self.source]
        what = self.package or self.name
        return f"{self.name} -> {what} {where} ({' '.join(self.pip_args)})"


# -- where the core came from ------------------------------------------------------------------------------


def _core_direct_url() -> dict:
    """PEP 610 ``direct_url.json`` of the installed core ({} when installed from an index or absent)."""
    try:
        text = metadata.distribution("posttrain").read_text("direct_url.json")
        return json.loads(text) if text else {}
    except (metadata.PackageNotFoundError, ValueError):
        return {}


def _is_checkout(root: Path) -> bool:
    return (root / "core" / "pyproject.toml").is_file() and (root / "plugins").is_dir()


def source_checkout() -> Path | None:
    """The posttrain repository the core was installed from, or None.

    ``POSTTRAIN_CHECKOUT`` first; then the directory pip recorded for the core (``direct_url.json``,
    written for ``pip install ./core`` and ``pip install -e ./core``); then the location of this very
    module (a source tree on ``sys.path``).
    """
    override = os.environ.get("POSTTRAIN_CHECKOUT", "").strip()
    if override:
        root = Path(override).expanduser().resolve()
        if not _is_checkout(root):
            raise PosttrainError(
                f"POSTTRAIN_CHECKOUT={override!r} is not a posttrain checkout: it needs core/pyproject.toml and a "
                "plugins/ folder. Point it at the repository's top folder, or unset it."
            )
        return root
    url = _core_direct_url().get("url", "")
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        core_dir = Path(unquote(urlparse(url).path))
        if _is_checkout(core_dir.parent):
            return core_dir.parent
    here = Path(__file__).resolve()
    if len(here.parents) > 4 and _is_checkout(here.parents[4]):  # <root>/core/src/posttrain/cli/install.py
        return here.parents[4]
    return None


def core_is_editable() -> bool:
    return bool(_core_direct_url().get("dir_info", {}).get("editable"))


# -- resolving names ---------------------------------------------------------------------------------------


def _project_of(path: Path) -> tuple[str | None, list[str]]:
    """(name, requirements) declared by a local project directory or wheel, as far as the stdlib can read."""
    if path.is_dir() and (path / "pyproject.toml").is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10: leave the checks to pip
            return None, []
        try:
            project = tomllib.loads((path / "pyproject.toml").read_text()).get("project", {})
        except (OSError, ValueError):
            return None, []
        return project.get("name"), list(project.get("dependencies", []))
    if path.is_file() and path.name.endswith(".whl"):
        import zipfile
        from email.parser import Parser

        try:
            with zipfile.ZipFile(path) as wheel:
                meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
                parsed = Parser().parsestr(wheel.read(meta).decode())
        except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError):
            return None, []
        return parsed.get("Name"), list(parsed.get_all("Requires-Dist") or [])
    return None, []


def _refuse_core(name: str) -> None:
    raise PluginError(
        f"{name!r} is the posttrain core itself; `posttrain install` adds plugin packages and never changes the "
        "core, so that a plugin cannot swap the version everything else was tested with. To change the core, use "
        "pip directly: `pip install -U posttrain` (or `pip install -e ./core` in a checkout)."
    )


def _check_core_range(label: str, requirements: list[str]) -> None:
    """Refuse a local package whose ``posttrain`` requirement excludes the installed core."""
    core = discovery.core_version()
    for req in requirements:
        req = req.split(";")[0].strip()
        m = re.match(r"^posttrain\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?$", req, re.IGNORECASE)
        if not m or not m.group(2).strip():
            continue
        spec = m.group(2).strip()
        try:
            ok = discovery.version_satisfies(core, spec)
        except ValueError:
            return  # unreadable: pip will judge
        if not ok:
            raise PluginError(
                f"{label} needs posttrain{spec}, but the installed core is posttrain {core}; `posttrain install` "
                "never changes the core. Use a release of the package made for this core, or first install a core "
                f"in that range (`pip install 'posttrain{spec}'`) and run the install again."
            )


def resolve(
    name: str, checkout: Path | None, editable: bool, use_index: bool, exact: bool, editable_paths: bool = False
) -> Target:
    """What pip is given for one NAME (see the module docstring for the rules).

    ``editable`` applies to packages taken from the checkout (it follows the core's install mode);
    ``editable_paths`` to directories given by path (``--editable``).
    """
    if URL_RE.match(name):
        return Target(name, [name], None, "url")
    looks_like_path = os.sep in name or "/" in name or name.startswith(".") or name.endswith(ARCHIVES)
    if looks_like_path:
        path = Path(name).expanduser()
        if not path.exists():
            raise PosttrainError(
                f"{name!r} looks like a path, but it does not exist. Give a package directory (with pyproject.toml), "
                "a wheel or an sdist, or a package name such as `dpo` or `posttrain-dpo`."
            )
        project, requires = _project_of(path)
        if project and plugin_index.normalize(project) == "posttrain":
            _refuse_core(project)
        _check_core_range(f"{project or path.name} ({path})", requires)
        args = ["-e", str(path.resolve())] if editable_paths and path.is_dir() else [str(path.resolve())]
        return Target(name, args, project, "path")
    m = REQUIREMENT_RE.fullmatch(name.strip())
    if not m:
        raise PosttrainError(
            f"{name!r} is neither a package name, a path nor a URL. Give e.g. `dpo`, `posttrain-dpo`, "
            "`'posttrain-dpo>=1,<2'`, ./plugins/posttrain-dpo or a wheel file."
        )
    base, extras, spec = m.group(1), m.group(2) or "", m.group(3).strip()
    if exact or "posttrain" in base.lower():
        package = base
    else:
        entry = plugin_index.lookup(base)
        package = entry["package"] if entry else f"posttrain-{base}"
    if plugin_index.normalize(package) == "posttrain":
        _refuse_core(name)
    local = checkout / "plugins" / plugin_index.normalize(package) if checkout else None
    if local and not use_index and not spec and (local / "pyproject.toml").is_file():
        _check_core_range(f"{package} ({local})", _project_of(local)[1])
        target = f"{local}{extras}"
        return Target(name, ["-e", target] if editable else [target], package, "checkout")
    return Target(name, [f"{package}{extras}{spec}"], package, "index")


# -- running pip -----------------------------------------------------------------------------------------


def _require_pip() -> None:
    if importlib.util.find_spec("pip") is None:
        raise PosttrainError(
            f"pip is not available in this environment ({sys.executable}), and `posttrain install` runs "
            "`python -m pip` so that packages land where posttrain runs (environments made by uv have no pip). "
            f"Add it with `{sys.executable} -m ensurepip`, or install with uv: "
            f"`uv pip install --python {sys.executable} PACKAGE`."
        )


def run_pip(args: list[str], quiet: bool, capture: bool = True) -> tuple[int, str]:
    """Run ``python -m pip ARGS``, echoing its output to stderr as it comes; return (exit code, output).

    ``capture=False`` leaves pip on the terminal, for its confirmation prompt.
    """
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    if quiet:
        command.append("--quiet")
    if not capture:
        return subprocess.call(command), ""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    return proc.wait(), "".join(lines)


def _snapshot() -> dict[tuple[str, str, str], dict]:
    """What ``posttrain list`` sees, read in a fresh interpreter (new paths of editable installs included)."""
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "list", "--json", "--all"], capture_output=True, text=True, timeout=120
    )
    try:
        rows = json.loads(out.stdout)
    except ValueError:
        return {}
    return {(r["kind"], r["name"], r["package"]): r for r in rows}


def _explain_failure(targets: list[Target], code: int, output: str) -> PosttrainError:
    """Turn pip's failure into what happened, why and how to fix it."""
    core = discovery.core_version()
    missing = re.findall(r"No matching distribution found for ([^\s]+)", output)
    if "(constraint) posttrain==" in output or re.search(r"depends on posttrain[ <>=!~]", output):
        cause = [line.strip() for line in output.splitlines() if "depends on posttrain" in line]
        detail = f" ({'; '.join(cause)})" if cause else ""
        return PluginError(
            f"pip found no version of {', '.join(t.package or t.name for t in targets)} that works with the "
            f"installed core, posttrain {core}{detail}; `posttrain install` never changes the core. Install a "
            "release made for this core (e.g. `posttrain install 'NAME<2'`), or upgrade the core first "
            "(`pip install -U posttrain`) and run the install again."
        )
    if missing:
        names = [re.split(r"[<>=!~\[]", m)[0] for m in missing]
        unpublished = [n for n in names if (e := plugin_index.find_package(n)) and not e.get("published")]
        checkout = source_checkout()
        where = (
            f"the source checkout {checkout} has no plugins/{names[0]} either"
            if checkout
            else "no posttrain source checkout was found to install from"
        )
        why = (
            f"{', '.join(unpublished)} {'is' if len(unpublished) == 1 else 'are'} not published on PyPI yet"
            if unpublished
            else f"the package index pip uses has no {', '.join(names)} (check the spelling; `posttrain list` shows "
            "what is installed and the plugin directory in the docs lists known packages)"
        )
        return PluginError(
            f"could not install {', '.join(names)}: {why}, and {where}. Official packages install from a clone of "
            "the posttrain repository: install the core from it (`pip install ./core`) and `posttrain install NAME` "
            "uses its plugins/ folder, or give the folder directly (`posttrain install /path/to/posttrain/plugins/"
            f"{names[0]}`)."
        )
    return PluginError(
        f"pip failed (exit code {code}) installing {', '.join(t.package or t.name for t in targets)}; its messages "
        "are above. Nothing of posttrain was changed; fix what pip reports and run the install again."
    )


def _report_changes(before: dict, after: dict) -> None:
    changed = [r for key, r in after.items() if key not in before or before[key]["version"] != r["version"]]
    if not changed:
        print("nothing new: the packages were already installed (use --upgrade or --force-reinstall to change them)")
        return
    by_package: dict[str, list[dict]] = {}
    for row in changed:
        by_package.setdefault(row["package"], []).append(row)
    for package, rows in sorted(by_package.items()):
        provides = ", ".join(f"{r['kind']} {r['name']}" for r in rows)
        print(f"installed {package} {rows[0]['version']}: {provides} ({rows[0]['status']})")
        for r in rows:
            if r["status"] in (discovery.BROKEN, discovery.INCOMPATIBLE, discovery.CONFLICT):
                print(f"  warning: {r['kind']} {r['name']} is {r['status']}: {r['reason']}", file=sys.stderr)


def install(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain install",
        description="Install plugin packages into this environment with pip, keeping the installed core. NAME is a "
        "package (posttrain-dpo), its short form (dpo), a method/reward/command name from the plugin index, a "
        "local path (directory, wheel, sdist) or a URL.",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-U", "--upgrade", action="store_true", help="upgrade packages that are already installed")
    p.add_argument("-e", "--editable", action="store_true", help="install local directories in editable mode")
    p.add_argument("--force-reinstall", action="store_true", help="reinstall even when the version is unchanged")
    p.add_argument("--no-cache-dir", action="store_true", help="do not use pip's cache")
    p.add_argument("--pre", action="store_true", help="allow pre-release versions")
    p.add_argument("--index", action="store_true", help="use the package index even when a source checkout is found")
    p.add_argument("--exact", action="store_true", help="take names as exact distribution names (no posttrain- prefix)")
    p.add_argument("--dry-run", action="store_true", help="show what each NAME resolves to and the pip command; stop")
    p.add_argument("-v", "--verbose", action="store_true", help="show all of pip's output")
    args = p.parse_args(argv)

    checkout = None if args.index else source_checkout()
    editable = args.editable or (checkout is not None and core_is_editable())
    targets = [resolve(n, checkout, editable, args.index, args.exact, editable_paths=args.editable) for n in args.names]
    core = discovery.core_version()
    flags = [f for f, on in (("--upgrade", args.upgrade), ("--force-reinstall", args.force_reinstall)) if on]
    flags += [f for f, on in (("--no-cache-dir", args.no_cache_dir), ("--pre", args.pre)) if on]
    for t in targets:
        print(f"{t.describe()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="posttrain-install-") as tmp:
        constraint = Path(tmp) / "keep-core.txt"
        constraint.write_text(f"posttrain=={core}\n")
        pip_args = ["install", "-c", str(constraint), *flags, *[a for t in targets for a in t.pip_args]]
        if args.dry_run:
            print(
                " ".join([sys.executable, "-m", "pip", *pip_args]).replace(str(constraint), "<posttrain==" + core + ">")
            )
            return 0
        _require_pip()
        before = _snapshot()
        code, output = run_pip(pip_args, quiet=not args.verbose)
    if code != 0:
        raise _explain_failure(targets, code, output)
    if discovery.core_version() != core:  # the constraint makes this impossible; say so loudly if it ever is not
        raise PosttrainError(
            f"the core changed from {core} to {discovery.core_version()} during the install, which the constraint "
            f"should prevent; reinstall posttrain {core} (`pip install posttrain=={core}`) and report this."
        )
    _report_changes(before, _snapshot())
    return 0


def run(command: str, argv: list[str]) -> int:
    return install(argv)
