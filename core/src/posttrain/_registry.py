"""Resolve what a run uses: its method, its reward functions and its callback plugins.

Entry points are found by :mod:`posttrain._discovery` from metadata; only what a run names is
imported. ``posttrain.plugins`` modules (pluggy hookimpls) are loaded here, for training only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

from posttrain import _discovery as discovery
from posttrain._errors import PluginError, PosttrainError


class MethodRegistry:
    """Handed to ``posttrain_register_methods``; ``add(name, method_class)``.

    Public as ``posttrain.hookspecs.MethodRegistry`` (for type hints in hook implementations).

    .. versionadded:: 1.0 (handed to the hook since 0.1)
    """

    def __init__(self) -> None:
        self.methods: dict[str, tuple[Any, str]] = {}

    def add(self, name: str, method_class: Any, source: str = "a posttrain_register_methods hook") -> None:
        if not discovery.NAME_RE.match(name):
            raise PluginError(f"{source} registered method {name!r}; names must match [a-z][a-z0-9_-]*")
        if name in self.methods:
            raise PluginError(f"method {name!r} is registered twice (by {self.methods[name][1]} and {source}).")
        self.methods[name] = (method_class, source)


class RewardRegistry:
    """Handed to ``posttrain_register_rewards``; ``add(name, func)``.

    Public as ``posttrain.hookspecs.RewardRegistry`` (for type hints in hook implementations).

    .. versionadded:: 1.0 (handed to the hook since 0.1)
    """

    def __init__(self) -> None:
        self.rewards: dict[str, Callable] = {}

    def add(self, name: str, func: Callable) -> None:
        if not callable(func):
            raise PluginError(f"reward {name!r} must be callable, got {type(func).__name__}")
        if name in self.rewards:
            raise PluginError(f"reward {name!r} is registered twice by posttrain_register_rewards hooks.")
        self.rewards[name] = func


class EnvironmentRegistry:
    """Handed to ``posttrain_register_environments``; ``add(name, environment_class)``."""

    def __init__(self) -> None:
        self.environments: dict[str, Any] = {}

    def add(self, name: str, environment_class: Any) -> None:
        if not discovery.NAME_RE.match(name):
            raise PluginError(
                f"a posttrain_register_environments hook registered {name!r}; names must match [a-z][a-z0-9_-]*"
            )
        if name in self.environments:
            raise PluginError(f"environment {name!r} is registered twice by posttrain_register_environments hooks.")
        self.environments[name] = environment_class


class CallbackRegistry:
    """Handed to ``posttrain_add_callbacks``; ``add(callback)``.

    Public as ``posttrain.hookspecs.CallbackRegistry`` (for type hints in hook implementations).

    .. versionadded:: 1.0 (handed to the hook since 0.1)
    """

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add(self, callback: Any) -> None:
        self.callbacks.append(callback)


_manager = None


def plugin_manager(load_entry_points: bool = True):
    """The process-wide pluggy manager, with enabled ``posttrain.plugins`` modules registered.

    A plugin module that fails to import or to register is reported (:func:`reported`) and skipped with a
    warning, since the run did not ask for it by name; ``POSTTRAIN_STRICT_PLUGINS=1`` makes it an error.
    """
    global _manager
    if _manager is not None:
        return _manager
    import pluggy

    from posttrain import hookspecs

    pm = pluggy.PluginManager("posttrain")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        for entry in discovery.discover(("plugin",)):
            name = f"{entry.package}:{entry.name}"
            try:
                if not entry.usable:
                    raise PluginError(
                        f"plugin {entry.name!r} from {entry.package} {entry.version} is {entry.status}: {entry.reason}."
                    )
                with reported(entry, "to import"):
                    module = discovery.load(entry)
                with reported(entry, "to register its hooks"):
                    pm.register(module, name=name)
                    pm.check_pending()  # a misspelt hook name is this plugin's error, not the next one's
                _entries[name] = entry
            except PluginError as exc:
                if pm.get_plugin(name) is not None:
                    pm.unregister(name=name)
                if os.environ.get("POSTTRAIN_STRICT_PLUGINS") == "1":
                    raise
                warnings.warn(
                    f"{exc} Skipped: this run goes on without it (POSTTRAIN_STRICT_PLUGINS=1 makes this an error).",
                    stacklevel=2,
                )
    pm.check_pending()
    _manager = pm
    return pm


#: pluggy's plugin name -> the entry point it was loaded from, so a failing hook names its package.
_entries: dict[str, discovery.Entry] = {}


def plugin_failure(entry: discovery.Entry, doing: str, exc: BaseException) -> PluginError:
    """The one report of a plugin whose code failed: what (kind, name, distribution, version, entry point), the
    exception's first line, and the fix (reinstall or uninstall; hide it meanwhile). ``doing`` completes
    "failed ...": "to import", "to register its hooks", "in posttrain_add_callbacks"."""
    if isinstance(exc, SystemExit):
        what = f"called sys.exit({exc.code!r})"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = f"raised {type(exc).__name__}" + (f": {text}" if text else "")
    group = discovery.GROUPS.get(entry.kind, entry.kind)
    return PluginError(
        f"{entry.kind} {entry.name!r} from {entry.package} {entry.version} failed {doing}: it {what} (entry point "
        f"{entry.name} = {entry.value} in {group}). This is a problem in {entry.package}, not in your run: "
        f"reinstall it (`posttrain install --force-reinstall {entry.package}`) or remove it (`posttrain uninstall "
        f"{entry.package}`); POSTTRAIN_DISABLE_PLUGINS={entry.package} hides it meanwhile. `posttrain doctor` "
        "shows the traceback."
    )


@contextlib.contextmanager
def reported(entry: discovery.Entry, doing: str = "to import"):
    """Any failure of a plugin's code inside the block (an exception, a ``BaseException``, ``sys.exit``) becomes
    the one-line :class:`PluginError` of :func:`plugin_failure`; only Ctrl-C and posttrain's own errors pass."""
    try:
        yield
    except (KeyboardInterrupt, PosttrainError):
        raise
    except BaseException as exc:
        raise plugin_failure(entry, doing, exc) from (exc if isinstance(exc, Exception) else None)


def call_hook(name: str, **kwargs: Any) -> None:
    """Call hook ``name`` on every registered plugin; a plugin that fails is named in a :class:`PluginError`."""
    pm = plugin_manager()
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    if any(getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False) for i in impls):
        caller(**kwargs)  # wrappers need pluggy's own call loop
        return
    for impl in reversed(impls):  # pluggy's order: last registered first
        entry = _entries.get(impl.plugin_name)
        try:
            if entry is not None:
                with reported(entry, f"in {name}"):
                    impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            else:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except (KeyboardInterrupt, PosttrainError):
            raise
        except BaseException as exc:  # a plugin registered in code (a test, a notebook): no package to name
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PluginError(
                f"plugin {impl.plugin_name} failed in {name}: it raised {type(exc).__name__}"
                f"{': ' + text if text else ''}. It was registered on the plugin manager in code, not installed: "
                "fix it there, or unregister it."
            ) from (exc if isinstance(exc, Exception) else None)


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests register throwaway plugins on a fresh one)."""
    global _manager
    _manager = None
    _entries.clear()


def _load(entry: discovery.Entry) -> Any:
    """Import what ``entry`` names; a failure is reported by :func:`reported`."""
    with reported(entry, "to import"):
        return discovery.load(entry)


def load_method(entry: discovery.Entry) -> Any:
    """Import a ``posttrain.methods`` entry and hold it to the Method protocol (a contract error names the package)."""
    from posttrain._method import method_problems

    obj = _load(entry)
    if not isinstance(obj, type):
        problems = [f"{entry.value} is a {type(obj).__name__}, not a class"]
    else:
        with reported(entry, "while its class was checked against the Method protocol"):
            problems = method_problems(obj)
    if problems:
        raise PluginError(
            f"method {entry.name!r} from {entry.package} {entry.version} breaks the plugin contract: "
            f"{'; '.join(problems)}. This is a problem in {entry.package}: upgrade it or report it to its authors; "
            f"hide it with POSTTRAIN_DISABLE_PLUGINS={entry.package}."
        )
    return obj


def instantiate(method_class: Any, name: str) -> Any:
    """``method_class()``, with a failure reported as the plugin's, naming its module."""
    try:
        return method_class()
    except (KeyboardInterrupt, PosttrainError):
        raise
    except BaseException as exc:
        where = f"{getattr(method_class, '__module__', '?')}.{getattr(method_class, '__qualname__', method_class)}"
        raise PluginError(
            f"method {name!r} ({where}) failed when created with no arguments: {type(exc).__name__}: {exc}. The loop "
            "creates methods as method_class(); this is a problem in the plugin: upgrade it or report it."
        ) from (exc if isinstance(exc, Exception) else None)


def resolve_method(name: str, allow_inactive: bool = False, hooks: bool = True) -> tuple[Any, discovery.Entry | None]:
    """Import the method class for ``name`` (warning once if it is experimental).

    With ``hooks=False`` (``check-data``, ``train METHOD --help``, ``info``) the ``posttrain.plugins`` modules are
    imported only if no installed distribution declares ``name``, since only a hook could then provide it.
    """
    entries = discovery.discover(("method",))
    plain = name.split(":", 1)[-1]
    if not hooks and any(e.name == discovery.normalize(plain) for e in entries):
        entry = discovery.find("method", name, entries, allow_inactive=allow_inactive)
        method_class = load_method(entry)
        discovery.warn_if_experimental(entry)
        return method_class, entry
    hooked = MethodRegistry()
    call_hook("posttrain_register_methods", registry=hooked)
    if plain in hooked.methods:
        if any(e.name == plain for e in entries):
            providers = sorted({e.package for e in entries if e.name == plain})
            raise PluginError(
                f"method {plain!r} is provided by {' and '.join(providers)} and by "
                f"{hooked.methods[plain][1]}; remove one of them."
            )
        return hooked.methods[plain][0], None
    entry = discovery.find("method", name, entries, allow_inactive=allow_inactive)
    method_class = load_method(entry)
    discovery.warn_if_experimental(entry)
    return method_class, entry


def resolve_rewards(names: list[str]) -> dict[str, Callable]:
    """Reward functions by name: hook-registered ones first, then ``posttrain.rewards`` entry points."""
    hooked = RewardRegistry()
    call_hook("posttrain_register_rewards", registry=hooked)
    entries = discovery.discover(("reward",))
    out = {}
    for name in names:
        if name in hooked.rewards:
            out[name] = hooked.rewards[name]
            continue
        entry = discovery.find("reward", name, entries)
        out[name] = _load(entry)
        discovery.warn_if_experimental(entry)
    return out


def resolve_environment(name: str) -> tuple[Any, discovery.Entry | None]:
    """The environment class for ``name``: hook-registered first, then ``posttrain.environments`` entry points
    (warning once if it is experimental)."""
    hooked = EnvironmentRegistry()
    call_hook("posttrain_register_environments", registry=hooked)
    if name in hooked.environments:
        return hooked.environments[name], None
    entry = discovery.find("environment", name, discovery.discover(("environment",)))
    environment_class = _load(entry)
    discovery.warn_if_experimental(entry)
    return environment_class, entry


def callbacks_for(config: Any) -> list[Any]:
    registry = CallbackRegistry()
    call_hook("posttrain_add_callbacks", registry=registry, config=config)
    return registry.callbacks
