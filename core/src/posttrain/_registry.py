"""Resolve what a run uses: its method, its reward functions and its callback plugins.

Entry points are found by :mod:`posttrain._discovery` from metadata; only what a run names is
imported. ``posttrain.plugins`` modules (pluggy hookimpls) are loaded here, for training only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from posttrain import _discovery as discovery
from posttrain._errors import PluginError


class MethodRegistry:
    """Handed to ``posttrain_register_methods``; ``add(name, method_class)``."""

    def __init__(self) -> None:
        self.methods: dict[str, tuple[Any, str]] = {}

    def add(self, name: str, method_class: Any, source: str = "a posttrain_register_methods hook") -> None:
        if not discovery.NAME_RE.match(name):
            raise PluginError(f"{source} registered method {name!r}; names must match [a-z][a-z0-9_-]*")
        if name in self.methods:
            raise PluginError(f"method {name!r} is registered twice (by {self.methods[name][1]} and {source}).")
        self.methods[name] = (method_class, source)


class RewardRegistry:
    """Handed to ``posttrain_register_rewards``; ``add(name, func)``."""

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
    """Handed to ``posttrain_add_callbacks``; ``add(callback)``."""

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
            try:
                if not entry.usable:
                    raise PluginError(entry.reason)
                pm.register(discovery.load(entry), name=f"{entry.package}:{entry.name}")
            except Exception as exc:
                if os.environ.get("POSTTRAIN_STRICT_PLUGINS") == "1":
                    raise PluginError(f"plugin {entry.name!r} from {entry.package} failed to load: {exc}") from exc
                warnings.warn(f"skipping plugin {entry.name!r} from {entry.package}: {exc}", stacklevel=2)
    pm.check_pending()
    _manager = pm
    return pm


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests register throwaway plugins on a fresh one)."""
    global _manager
    _manager = None


def _load(entry: discovery.Entry) -> Any:
    """Import what ``entry`` names; a plugin that fails to import is a PluginError naming the package and the fix."""
    try:
        return discovery.load(entry)
    except Exception as exc:
        raise PluginError(
            f"{entry.kind} {entry.name!r} from {entry.package} {entry.version} failed to import: "
            f"{type(exc).__name__}: {exc}. `posttrain doctor` shows the traceback; reinstall or upgrade "
            f"{entry.package}, or hide it with POSTTRAIN_DISABLE_PLUGINS={entry.package}."
        ) from exc


def resolve_method(name: str, allow_inactive: bool = False) -> tuple[Any, discovery.Entry | None]:
    """Import the method class for ``name`` (warning once if it is experimental)."""
    hooked = MethodRegistry()
    plugin_manager().hook.posttrain_register_methods(registry=hooked)
    entries = discovery.discover(("method",))
    plain = name.split(":", 1)[-1]
    if plain in hooked.methods:
        if any(e.name == plain for e in entries):
            providers = sorted({e.package for e in entries if e.name == plain})
            raise PluginError(
                f"method {plain!r} is provided by {' and '.join(providers)} and by "
                f"{hooked.methods[plain][1]}; remove one of them."
            )
        return hooked.methods[plain][0], None
    entry = discovery.find("method", name, entries, allow_inactive=allow_inactive)
    method_class = _load(entry)
    discovery.warn_if_experimental(entry)
    return method_class, entry


def resolve_rewards(names: list[str]) -> dict[str, Callable]:
    """Reward functions by name: hook-registered ones first, then ``posttrain.rewards`` entry points."""
    hooked = RewardRegistry()
    plugin_manager().hook.posttrain_register_rewards(registry=hooked)
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
    plugin_manager().hook.posttrain_register_environments(registry=hooked)
    if name in hooked.environments:
        return hooked.environments[name], None
    entry = discovery.find("environment", name, discovery.discover(("environment",)))
    environment_class = _load(entry)
    discovery.warn_if_experimental(entry)
    return environment_class, entry


def callbacks_for(config: Any) -> list[Any]:
    registry = CallbackRegistry()
    plugin_manager().hook.posttrain_add_callbacks(registry=registry, config=config)
    return registry.callbacks
