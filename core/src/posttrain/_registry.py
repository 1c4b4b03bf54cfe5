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

    A plugin module that fails to import is skipped with a warning (an error when
    ``POSTTRAIN_STRICT_PLUGINS=1``), since the run did not ask for it by name.
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
                    raise PluginError(entry.reason)
                with guarded(entry):
                    pm.register(discovery.load(entry), name=name)
                    pm.check_pending()  # a misspelt hook name is this plugin's error, not the next one's
            except PluginError as exc:
                if pm.get_plugin(name) is not None:
                    pm.unregister(name=name)
                if os.environ.get("POSTTRAIN_STRICT_PLUGINS") == "1":
                    raise
                warnings.warn(f"skipping plugin {entry.name!r} from {entry.package}: {exc}", stacklevel=2)
    pm.check_pending()
    _manager = pm
    return pm


@contextlib.contextmanager
def guarded(entry: discovery.Entry):
    """Any failure of a plugin's code while it is imported or checked (an exception, ``sys.exit``) becomes a
    one-line :class:`PluginError` naming its package; only Ctrl-C passes through."""
    try:
        yield
    except (KeyboardInterrupt, PluginError):
        raise
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            what = f"called sys.exit({exc.code!r})"
        else:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            what = f"raised {type(exc).__name__}" + (f": {text}" if text else "")
        raise PluginError(
            f"{entry.kind} {entry.name!r} from {entry.package} {entry.version} failed to load: it {what}. This is a "
            f"problem in {entry.package}: `posttrain doctor` shows the traceback; reinstall or upgrade it, or hide it "
            f"with POSTTRAIN_DISABLE_PLUGINS={entry.package}."
        ) from (exc if isinstance(exc, Exception) else None)


def call_hook(name: str, **kwargs: Any) -> None:
    """Call hook ``name`` on every registered plugin; a plugin that fails is named in a :class:`PluginError`."""
    pm = plugin_manager()
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    if any(getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False) for i in impls):
        caller(**kwargs)  # wrappers need pluggy's own call loop
        return
    for impl in reversed(impls):  # pluggy's order: last registered first
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except (KeyboardInterrupt, PosttrainError):
            raise
        except BaseException as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PluginError(
                f"plugin {impl.plugin_name} failed in {name}: {type(exc).__name__}{': ' + text if text else ''}. "
                f"This is a problem in that plugin: upgrade or reinstall it, or hide its package with "
                "POSTTRAIN_DISABLE_PLUGINS."
            ) from (exc if isinstance(exc, Exception) else None)


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests register throwaway plugins on a fresh one)."""
    global _manager
    _manager = None


def _load(entry: discovery.Entry) -> Any:
    """Import what ``entry`` names; a plugin that fails to import is a PluginError naming the package and the fix."""
    try:
        return discovery.load(entry)
    except (KeyboardInterrupt, PluginError):
        raise
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            what = f"called sys.exit({exc.code!r}) while being imported"
        else:
            what = f"{type(exc).__name__}: {exc}"
        raise PluginError(
            f"{entry.kind} {entry.name!r} from {entry.package} {entry.version} failed to import: "
            f"{what}. `posttrain doctor` shows the traceback; reinstall or upgrade "
            f"{entry.package}, or hide it with POSTTRAIN_DISABLE_PLUGINS={entry.package}."
        ) from (exc if isinstance(exc, Exception) else None)


def load_method(entry: discovery.Entry) -> Any:
    """Import a ``posttrain.methods`` entry and hold it to the Method protocol (a contract error names the package)."""
    from posttrain._method import method_problems

    obj = _load(entry)
    if not isinstance(obj, type):
        problems = [f"{entry.value} is a {type(obj).__name__}, not a class"]
    else:
        with guarded(entry):
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


def callbacks_for(config: Any) -> list[Any]:
    registry = CallbackRegistry()
    call_hook("posttrain_add_callbacks", registry=registry, config=config)
    return registry.callbacks
