"""The declared plugin API, enforced: plugins and scaffolded packages import only what core declares.

Core declares its plugin API as the ``__all__`` of each module in ``posttrain.PUBLIC_MODULES``. This file
checks both sides of that boundary:

- every listed module exists (or is skipped with a note while it is being written) and its ``__all__``
  names resolve and carry a ``versionadded`` note (the API reference is generated from them);
- every ``plugins/*/src`` tree and every freshly scaffolded package (each template) imports only declared
  modules and names: ``import posttrain.x``, ``from posttrain.x import y``, ``import posttrain.x as z``,
  imports inside functions, ``importlib.import_module("posttrain.x")``, and attribute access on an
  imported module (``posttrain.loop.train``, ``posttrain._registry.resolve_rewards``).

Known offenders are listed in :data:`KNOWN_VIOLATIONS` with a reason. Their plugin's test is an xfail
that names them; a new violation in the same plugin still fails, and so does a listed one that has been
fixed (so the list is updated the day it happens).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import posttrain
import pytest
from posttrain._lifecycle import scaffold

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCES = sorted(p for p in (ROOT / "plugins").glob("*/src") if p.is_dir())

#: (distribution, undeclared module or name) -> why it is still imported. Remove an entry when it is fixed;
#: the plugin's test fails until then. Empty since GRPO and RLOO moved onto posttrain.rewards.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


# -- what core declares ---------------------------------------------------------------------------------------


@cache
def declared(module: str) -> frozenset[str] | None:
    """The ``__all__`` of a public module, or None when the module does not exist (yet)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise
    return frozenset(getattr(mod, "__all__", ()))  # test_public_module_declares_its_names fails a missing one


def is_public_module(module: str) -> bool:
    return module in posttrain.PUBLIC_MODULES


@pytest.mark.parametrize("module", posttrain.PUBLIC_MODULES)
def test_public_module_declares_its_names(module):
    names = declared(module)
    if names is None:
        pytest.skip(f"{module} is listed in posttrain.PUBLIC_MODULES but not written yet (in progress)")
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), list), (
        f"{module} is a public module without an explicit __all__ list; declare the names plugins may import"
    )
    missing = sorted(n for n in names if not hasattr(mod, n))
    assert not missing, f"{module}.__all__ lists names the module does not define: {missing}"
    private = sorted(n for n in names if n.startswith("_") and not n.startswith("__"))
    assert not private, f"{module}.__all__ exports private names {private}; drop the underscore or the export"


def _attribute_docstring(module: str, name: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The string literal right after ``name = ...`` in ``module``'s source, following re-exports."""
    mod = importlib.import_module(module)
    lazy = getattr(mod, "_LAZY", {})  # posttrain's top level imports its names on first use
    if name in lazy and lazy[name][0] not in seen:
        return _attribute_docstring(lazy[name][0], lazy[name][1], seen | {module})
    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError):
        return None
    body = tree.body
    for i, node in enumerate(body):
        targets = (
            [t.id for t in node.targets if isinstance(t, ast.Name)]
            if isinstance(node, ast.Assign)
            else [node.target.id]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            else []
        )
        if name in targets and i + 1 < len(body):
            after = body[i + 1]
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                return str(after.value.value)
        if isinstance(node, ast.ImportFrom) and node.module and node.module not in seen:
            if any((a.asname or a.name) == name for a in node.names):
                return _attribute_docstring(node.module, name, seen | {module})
    return None


def public_names() -> list[tuple[str, str]]:
    out = []
    for module in posttrain.PUBLIC_MODULES:
        names = declared(module)
        out += [(module, n) for n in sorted(names or ()) if n != "__version__"]  # __version__ is computed
    return out


@pytest.mark.parametrize(("module", "name"), public_names())
def test_every_public_name_says_when_it_was_added(module, name):
    """The API reference lists each name with the version that added it (docs/api.md)."""
    obj = getattr(importlib.import_module(module), name)
    own = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) else None
    text = _attribute_docstring(module, name) or own or ""
    assert ".. versionadded::" in text, (
        f"{module}.{name} has no '.. versionadded:: X.Y' note in its docstring; add one (0.1 for names that "
        "existed in 0.1, 1.0 for new ones) so the API reference and the compatibility policy can say since when "
        "it is promised"
    )


# -- what plugins import -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    name: str  # the undeclared module or name, dotted: posttrain._registry, posttrain.loop._helper
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}: {self.why}"


def _check_module(module: str, path: Path, line: int) -> Violation | None:
    if is_public_module(module):
        if declared(module) is None:
            return Violation(path, line, module, "listed as public, but this core does not have it yet")
        return None
    parent, _, last = module.rpartition(".")
    if is_public_module(parent) and last in (declared(parent) or ()):
        return None  # ``import posttrain.x`` where x is a declared name of posttrain (never a module today)
    return Violation(path, line, module, "not a public module (posttrain.PUBLIC_MODULES); use the declared API")


def _check_name(module: str, name: str, path: Path, line: int) -> tuple[str | None, Violation | None]:
    """(the public module ``module.name`` is, or None; a violation, or None)."""
    dotted = f"{module}.{name}"
    if is_public_module(dotted):
        return dotted, _check_module(dotted, path, line)
    names = declared(module)
    if names is None:
        return None, Violation(path, line, module, "listed as public, but this core does not have it yet")
    if name in names or name == "*" or (name.startswith("__") and name.endswith("__")):
        return None, None
    if name.startswith("_"):
        why = "a private module or name"
    else:
        why = f"not in {module}.__all__"
    return None, Violation(path, line, dotted, why)


def violations_in(path: Path, display: Path | None = None) -> list[Violation]:
    """Every import of an undeclared posttrain module or name in one Python file."""
    shown = display or path
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}  # local name -> the posttrain module it is bound to
    found: list[Violation] = []

    def add(v: Violation | None) -> None:
        if v is not None:
            found.append(v)

    for node in ast.walk(tree):  # imports anywhere, functions included, bind aliases for the pass below
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "posttrain":
                    continue
                add(_check_module(a.name, shown, node.lineno))
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases["posttrain"] = "posttrain"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "posttrain":
                continue
            bad = _check_module(node.module, shown, node.lineno)
            if bad:
                found.append(bad)
                continue
            for a in node.names:
                submodule, v = _check_name(node.module, a.name, shown, node.lineno)
                add(v)
                if submodule:
                    aliases[a.asname or a.name] = submodule
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            target = node.args[0].value
            if fname in ("import_module", "__import__") and isinstance(target, str):
                if target.split(".")[0] == "posttrain":
                    add(_check_module(target, shown, node.lineno))

    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue  # only whole chains: posttrain.loop.train, not its inner posttrain.loop
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in aliases:
            continue
        module = aliases[base.id]
        for part in reversed(chain):
            submodule, v = _check_name(module, part, shown, node.lineno)
            add(v)
            if submodule is None:
                break
            module = submodule
    return sorted(set(found), key=lambda v: (str(v.path), v.line, v.name))


def violations_in_tree(root: Path) -> list[Violation]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts or any(p.endswith(".egg-info") for p in path.parts):
            continue
        out += violations_in(path, path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return out


def _distribution(src: Path) -> str:
    return src.parent.name


@pytest.mark.parametrize("src", PLUGIN_SOURCES, ids=[_distribution(s) for s in PLUGIN_SOURCES])
def test_plugin_imports_only_the_declared_api(src):
    plugin = _distribution(src)
    found = violations_in_tree(src)
    known = {name: why for (dist, name), why in KNOWN_VIOLATIONS.items() if dist == plugin}
    unexpected = [v for v in found if v.name not in known]
    assert not unexpected, (
        f"{plugin} imports names core does not declare public:\n"
        + "\n".join(f"  {v}" for v in unexpected)
        + "\nImport them from a module in posttrain.PUBLIC_MODULES (its __all__), copy the code with a "
        "'# Copied from' marker, or ask for the name to be declared (docs/api.md)."
    )
    fixed = sorted(set(known) - {v.name for v in found})
    assert not fixed, (
        f"{plugin} no longer imports {fixed}: remove them from KNOWN_VIOLATIONS in {Path(__file__).name}, "
        "so the boundary is enforced for this plugin from now on"
    )
    if known:
        pytest.xfail(f"{plugin}: known boundary violations: " + "; ".join(f"{n} ({w})" for n, w in known.items()))


def test_known_violations_name_real_plugins():
    plugins = {_distribution(s) for s in PLUGIN_SOURCES}
    assert {dist for dist, _ in KNOWN_VIOLATIONS} <= plugins


@pytest.mark.parametrize("template", scaffold.template_names())
def test_scaffolded_package_imports_only_the_declared_api(template, tmp_path):
    root = scaffold.generate(f"bound-{template}", tmp_path / "pkg", author="", core_version="1.0", template=template)
    found = violations_in_tree(root)
    assert not found, f"the {template!r} template imports undeclared names:\n" + "\n".join(f"  {v}" for v in found)


# -- the checker itself --------------------------------------------------------------------------------------

SAMPLE = """
import posttrain
import posttrain.loop as loop_module
import posttrain._registry
from posttrain import LossOutput, models, _discovery
from posttrain import not_a_name
from posttrain.data import check, _check_text
from posttrain.cli import main
from posttrain.testing import kit


def later():
    from posttrain._environment import provenance
    import importlib
    importlib.import_module("posttrain._tracking")
    return posttrain.loop.train, posttrain._registry.resolve_rewards, loop_module._set_up, models.reference_model
    return kit.conformance_suite, posttrain.__version__, models._check_path
"""


def test_checker_finds_every_form(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(SAMPLE)
    names = sorted({v.name for v in violations_in(path)})
    assert names == [
        "posttrain._discovery",
        "posttrain._environment",
        "posttrain._registry",
        "posttrain._tracking",
        "posttrain.cli",
        "posttrain.data._check_text",
        "posttrain.loop._set_up",
        "posttrain.models._check_path",
        "posttrain.not_a_name",
    ]
    lines = {v.name: v.line for v in violations_in(path)}
    assert lines["posttrain._environment"] == 13 and lines["posttrain.loop._set_up"] == 16
    assert all(str(v).startswith(f"{path}:") for v in violations_in(path))
