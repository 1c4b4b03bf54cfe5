"""Find installed plugins from package metadata alone.

Nothing here imports plugin code, torch or even pluggy: ``posttrain list`` reads only
``entry_points.txt`` and ``METADATA`` of each distribution, so it stays fast and a broken plugin
can never crash it.

A distribution declares what it provides with entry points; the entry-point *name* is the public
name::

    [project.entry-points."posttrain.methods"]
    dpo = "posttrain_dpo:DPO"
    [project.entry-points."posttrain.rewards"]
    accuracy = "posttrain_rewards:accuracy"
    [project.entry-points."posttrain.plugins"]
    wandb = "posttrain_wandb.hooks"       # a module with @hookimpl functions

Its status comes from the standard ``Development Status`` classifier and its core compatibility
from its ``Requires-Dist: posttrain ...`` line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from importlib import metadata

GROUPS = {
    "method": "posttrain.methods",
    "reward": "posttrain.rewards",
    "plugin": "posttrain.plugins",
    "command": "posttrain.commands",  # CLI subcommands: name = command, value = module:function(argv) -> int
}
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

STABLE, EXPERIMENTAL, INACTIVE = "stable", "experimental", "inactive"
BROKEN, INCOMPATIBLE, CONFLICT = "broken", "incompatible", "conflict"
DOCS_PROMOTION = "https://posttrain.readthedocs.io/promotion/"


class Entry:
    """One thing a distribution provides (a method, a reward or a hook plugin).

    A plain class rather than a dataclass: ``dataclasses`` costs ~20 ms of import on the
    ``posttrain list`` path.
    """

    FIELDS = (
        "kind",
        "name",
        "value",
        "package",
        "version",
        "summary",
        "status",
        "declared_status",
        "requires_core",
        "reason",
        "docs_url",
        "location",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        kind: str,
        name: str,
        value: str,
        package: str,
        version: str,
        summary: str,
        status: str,
        declared_status: str,
        requires_core: str,
        reason: str = "",
        docs_url: str = "",
        location: str = "",
    ):
        self.kind = kind  # "method" | "reward" | "plugin"
        self.name = name  # public name (the entry-point name)
        self.value = value  # "module:attr"
        self.package = package  # distribution name
        self.version = version
        self.summary = summary
        self.status = status  # stable | experimental | inactive | broken | incompatible | conflict
        self.declared_status = declared_status  # stable | experimental | inactive, from the classifier alone
        self.requires_core = requires_core  # e.g. ">=0.1,<1"; "" when undeclared
        self.reason = reason  # why the entry is broken / incompatible / in conflict
        self.docs_url = docs_url
        self.location = location

    @property
    def usable(self) -> bool:
        return self.status in (STABLE, EXPERIMENTAL)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"Entry({self.kind} {self.name!r} from {self.package} {self.version}, {self.status})"


# -- status and compatibility, from metadata --------------------------------------------------------


def status(dist: metadata.Distribution) -> str:
    """Status a distribution declares through its ``Development Status`` classifier.

    ``5 - Production/Stable`` and ``6 - Mature`` mean stable, ``7 - Inactive`` inactive, anything
    else (or no classifier) experimental. With several such classifiers the lowest wins.
    """
    levels = []
    for classifier in dist.metadata.get_all("Classifier") or []:
        m = re.match(r"Development Status\s*::\s*(\d)", classifier)
        if m:
            levels.append(int(m.group(1)))
    if not levels:
        return EXPERIMENTAL
    level = min(levels)
    if level == 7:
        return INACTIVE
    return STABLE if level >= 5 else EXPERIMENTAL


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.strip().split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts) or (0,)


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def version_satisfies(version: str, specifier: str) -> bool:
    """Evaluate a PEP 440 specifier for release versions, without importing ``packaging``.

    Supports ``>=, <=, >, <, ==, !=, ~=`` and ``==X.*``; pre-release tags are ignored.
    Raises ``ValueError`` for a clause it cannot read.
    """
    v = _version_tuple(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        m = re.match(r"^(~=|===|==|!=|<=|>=|<|>)\s*([0-9][0-9a-zA-Z.*+!-]*)$", clause)
        if not m:
            raise ValueError(f"cannot read version clause {clause!r}")
        op, target = m.groups()
        if op in ("==", "!=") and target.endswith(".*"):
            prefix = _version_tuple(target[:-2])
            match = v[: len(prefix)] == prefix
            ok = match if op == "==" else not match
        elif op == "~=":
            t = _version_tuple(target)
            ok = _cmp(v, t) >= 0 and v[: len(t) - 1] == t[:-1]
        else:
            c = _cmp(v, _version_tuple(target))
            ok = {"==": c == 0, "===": c == 0, "!=": c != 0, "<=": c <= 0, ">=": c >= 0, "<": c < 0, ">": c > 0}[op]
        if not ok:
            return False
    return True


def core_requirement(dist: metadata.Distribution) -> str:
    """The version specifier a distribution puts on ``posttrain`` ("" when it has none)."""
    for req in dist.requires or []:
        req = req.split(";")[0].strip()  # drop environment markers
        m = re.match(r"^posttrain\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?$", req, re.IGNORECASE)
        if m:
            return m.group(2).strip()
    return ""


def core_version() -> str:
    try:
        return metadata.version("posttrain")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# -- discovery ---------------------------------------------------------------------------------------


def normalize(name: str) -> str:
    """A name as pip compares it (PEP 503): case-insensitive, runs of ``-``, ``_`` and ``.`` are one ``-``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _env_list(name: str) -> set[str] | None:
    """The normalised names of a comma-separated environment variable, None when it is unset or blank."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    return {normalize(item) for item in raw.split(",") if item.strip()}


def _allowed(package: str, name: str) -> bool:
    """Operator allow/block lists match a distribution name or a provided name, spelt in any way pip accepts
    (``Posttrain_DPO`` blocks ``posttrain-dpo``), so a block cannot be dodged by spelling."""
    allow, block = _env_list("POSTTRAIN_PLUGINS"), _env_list("POSTTRAIN_DISABLE_PLUGINS")
    keys = {normalize(package), normalize(name)}
    if block and keys & block:
        return False
    return not (allow is not None and not keys & allow)


def _docs_url(dist: metadata.Distribution) -> str:
    """The package's documentation link: a Documentation/Docs URL before a Homepage one, whatever the order."""
    urls = {}
    for url in dist.metadata.get_all("Project-URL") or []:
        label, _, link = url.partition(",")
        urls.setdefault(label.strip().lower(), link.strip())
    for label in ("documentation", "docs", "homepage"):
        if urls.get(label):
            return urls[label]
    return dist.metadata.get("Home-page") or ""


def discover(kinds: tuple[str, ...] = ("method", "reward", "plugin")) -> list[Entry]:
    """Every entry point of the posttrain groups, with status, compatibility and conflicts.

    Reads metadata only. Distributions that appear twice on ``sys.path`` count once (the first, as
    import would pick). Operator lists ``POSTTRAIN_PLUGINS`` / ``POSTTRAIN_DISABLE_PLUGINS`` apply.
    """
    entries: list[Entry] = []
    seen: set[str] = set()
    core = core_version()
    wanted = {GROUPS[k]: k for k in kinds}
    for dist in metadata.distributions():
        # Cheap filter first: parsing METADATA costs ~1 ms per distribution, entry_points.txt far less.
        try:
            text = dist.read_text("entry_points.txt") or ""
        except Exception:
            text = ""
        if "[posttrain." not in text:
            continue
        try:
            package = dist.metadata.get("Name") or ""
        except Exception:  # unreadable METADATA; nothing to show it under
            continue
        key = normalize(package)
        if not package or key in seen:
            continue
        try:
            eps = [ep for ep in dist.entry_points if ep.group in wanted]
        except Exception as exc:  # malformed entry_points.txt
            eps = []
            entries.append(_broken(package, dist, f"unreadable entry points: {exc}"))
        if not eps:
            continue
        seen.add(key)
        declared = status(dist)
        requires = core_requirement(dist)
        compat_reason = ""
        try:
            if requires and not version_satisfies(core, requires):
                compat_reason = f"needs posttrain{requires}, installed posttrain {core}"
        except ValueError as exc:
            compat_reason = f"malformed core requirement {requires!r}: {exc}"
            declared_problem = True
        else:
            declared_problem = False
        for ep in eps:
            kind = wanted[ep.group]
            if not _allowed(package, ep.name):
                continue
            entry = Entry(
                kind=kind,
                name=ep.name,
                value=ep.value,
                package=package,
                version=dist.version or "?",
                # .get: the importlib_metadata backport (imported by mlflow, OpenTelemetry ...) takes over
                # importlib.metadata's finders, and its metadata raises KeyError for a missing field
                summary=(dist.metadata.get("Summary") or "").strip(),
                status=declared,
                declared_status=declared,
                requires_core=requires,
                docs_url=_docs_url(dist),
                location=str(getattr(dist, "_path", "")),
            )
            entry.status, entry.reason = _check(entry, compat_reason, declared_problem)
            entries.append(entry)
    _mark_conflicts(entries)
    return sorted(entries, key=lambda e: (e.kind, e.name, e.package))


def _broken(package: str, dist: metadata.Distribution, reason: str) -> Entry:
    return Entry("method", "?", "", package, dist.version or "?", "", BROKEN, EXPERIMENTAL, "", reason)


def _check(entry: Entry, compat_reason: str, declared_problem: bool) -> tuple[str, str]:
    if not NAME_RE.match(entry.name):
        return BROKEN, f"invalid name {entry.name!r}: names must match [a-z][a-z0-9_-]*"
    module, _, attr = entry.value.partition(":")
    if not module or (entry.kind != "plugin" and not attr):
        return BROKEN, f"entry point value {entry.value!r} must be 'module:attribute'"
    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return BROKEN, f"module {top!r} is not importable (not installed, or installed without its code)"
    if declared_problem:
        return BROKEN, compat_reason
    if compat_reason:
        return INCOMPATIBLE, compat_reason
    return entry.declared_status, ""


def _mark_conflicts(entries: list[Entry]) -> None:
    by_name: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        if e.name != "?":
            by_name.setdefault((e.kind, e.name), []).append(e)
    for (kind, name), group in by_name.items():
        packages = sorted({e.package for e in group})
        if len(packages) > 1:
            for e in group:
                e.reason = f"{kind} {name!r} is provided by {' and '.join(packages)}"
                if e.status in (STABLE, EXPERIMENTAL, INACTIVE):
                    e.status = CONFLICT


# -- resolving a name for use -------------------------------------------------------------------------


def _suggest(name: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    return ""


def find(kind: str, name: str, entries: list[Entry] | None = None, allow_inactive: bool = False) -> Entry:
    """The single usable entry for ``name`` (``package:name`` picks a provider).

    Raises :class:`posttrain.PluginError` naming the problem and its fix: unknown name (with
    suggestions), conflict (naming both distributions), broken, incompatible or inactive.
    """
    from posttrain._errors import PluginError

    entries = discover((kind,)) if entries is None else entries
    package = None
    if ":" in name:
        package, name = name.split(":", 1)
    matches = [e for e in entries if e.kind == kind and normalize(e.name) == normalize(name)]
    if package:
        matches = [e for e in matches if normalize(e.package) == normalize(package)]
    if not matches:
        from posttrain.cli.plugin_index import not_installed_message

        known = sorted({e.name for e in entries if e.kind == kind})
        indexed = None if package else not_installed_message(kind, name)
        if indexed:  # a package we know provides it: say which, and how to install it
            raise PluginError(indexed + (f" Installed {kind}s: {', '.join(known)}." if known else ""))
        hint = _suggest(name, known)
        listing = f" Installed: {', '.join(known)}." if known else f" No {kind} plugins are installed."
        install = (
            f" If it is published as posttrain-{name}, install it with `posttrain install {name}`; `posttrain list` "
            "shows what is installed."
            if kind == "method" and not hint
            else ""
        )
        lists = [f"{v}={os.environ[v]!r}" for v in ("POSTTRAIN_PLUGINS", "POSTTRAIN_DISABLE_PLUGINS") if _env_list(v)]
        if lists:  # an operator list may be what hides it
            one = len(lists) == 1
            install = (
                f" {' and '.join(lists)} {'is' if one else 'are'} set, which hides the plugins not allowed; "
                f"if {name!r} is installed, change or unset {'it' if one else 'them'}."
            )
        raise PluginError(f"unknown {kind} {name!r}.{hint}{listing}{install}")
    if len({e.package for e in matches}) > 1:
        packages = sorted({e.package for e in matches})
        choices = " or ".join(f"'{p}:{name}'" for p in packages)
        raise PluginError(
            f"{kind} {name!r} is provided by {' and '.join(packages)}; "
            f"choose one by naming it as {choices}, or uninstall one of them."
        )
    entry = matches[0]
    if entry.status == BROKEN:
        raise PluginError(
            f"{kind} {name!r} from {entry.package} {entry.version} is broken: {entry.reason}. Reinstall it "
            f"(`pip install --force-reinstall {entry.package}`) or uninstall it."
        )
    if entry.status == INCOMPATIBLE:
        raise PluginError(
            f"{kind} {name!r} from {entry.package} {entry.version} is incompatible: {entry.reason}. "
            f"Upgrade the plugin (`pip install -U {entry.package}`) or install a matching posttrain."
        )
    if entry.declared_status == INACTIVE and not allow_inactive:
        raise PluginError(
            f"{kind} {name!r} from {entry.package} {entry.version} is inactive (retired); "
            "pass --allow_inactive true to use it anyway."
        )
    return entry


def load(entry: Entry):
    """Import the object an entry point names. Import errors propagate with their traceback."""
    module_name, _, attr = entry.value.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


# -- the experimental warning --------------------------------------------------------------------------

_warned: set[str] = set()


def _silenced(name: str) -> bool:
    raw = os.environ.get("POSTTRAIN_EXPERIMENTAL_SILENCE", "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes", "all"):
        return True
    names = {normalize(n) for n in raw.split(",") if n.strip()}
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad:
        warnings.warn(
            f"POSTTRAIN_EXPERIMENTAL_SILENCE={raw!r} is not understood; use 1 or a comma-separated list of "
            "method names such as 'kto,orpo'.",
            stacklevel=3,
        )
    return normalize(name) in names


def warn_if_experimental(entry: Entry) -> bool:
    """Emit :class:`posttrain.ExperimentalWarning` once per method per process. Returns True if emitted."""
    from posttrain._errors import ExperimentalWarning

    if entry.declared_status != EXPERIMENTAL or entry.name in _warned or _silenced(entry.name):
        return False
    _warned.add(entry.name)
    warnings.warn(
        f"{entry.kind} {entry.name!r} ({entry.package} {entry.version}) is experimental: its behaviour and "
        f"configuration may change in any release. See {DOCS_PROMOTION} for what it takes to become stable. "
        f"Silence with POSTTRAIN_EXPERIMENTAL_SILENCE={entry.name}.",
        ExperimentalWarning,
        stacklevel=3,
    )
    return True
