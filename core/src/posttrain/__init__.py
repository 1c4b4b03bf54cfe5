"""posttrain: post-training for language models, one installable package per method.

The top-level package is cheap to import: it pulls in neither torch nor pluggy until
one of the names below is actually used, so ``posttrain list`` and ``--help`` stay fast.
"""

from __future__ import annotations

from posttrain._errors import (
    ConfigError,
    DataError,
    ExperimentalWarning,
    PluginError,
    PosttrainError,
    RowProblem,
)

TYPE_CHECKING = False  # not imported from typing: keeps `import posttrain` (and `posttrain list`) cheap
if TYPE_CHECKING:  # pragma: no cover
    from posttrain._method import Callback, LossOutput, Method, Metric, TrainContext, TrainOutcome
    from posttrain.config import TrainingConfig
    from posttrain.hookspecs import hookimpl
    from posttrain.loop import TrainResult, train

API_VERSION = "1.0"
"""Version of the plugin API: the names in ``__all__`` of every module in :data:`PUBLIC_MODULES`.

A minor version only adds (names, optional arguments, optional Method members); a major version may
remove or change, after a deprecation (docs/api.md, "Compatibility"). Plugins declare the core range
they support as ``Requires-Dist: posttrain>=X.Y,<X+1``.

.. versionadded:: 0.1
.. versionchanged:: 1.0 covers every module of :data:`PUBLIC_MODULES`, not only hooks and the protocol.
"""

PUBLIC_MODULES = (
    "posttrain",
    "posttrain.config",
    "posttrain.data",
    "posttrain.models",
    "posttrain.ops",
    "posttrain.loop",
    "posttrain.hookspecs",
    "posttrain.rewards",
    "posttrain.generation",
    "posttrain.environments",
    "posttrain.vision",
    "posttrain.testing",
    "posttrain.testing.environments",
    "posttrain.testing.kit",
    "posttrain.testing.parity",
    "posttrain.testing.copies",
)
"""The modules whose ``__all__`` is the plugin API; every other module (``posttrain._*``, ``posttrain.cli``)
may change in any release. ``tests/test_api_boundary.py`` fails any plugin or scaffolded package that
imports something else.

.. versionadded:: 1.0
"""

__all__ = [
    "API_VERSION",
    "PUBLIC_MODULES",
    "Callback",
    "ConfigError",
    "DataError",
    "ExperimentalWarning",
    "LossOutput",
    "Method",
    "Metric",
    "PluginError",
    "PosttrainError",
    "RowProblem",
    "TrainContext",
    "TrainOutcome",
    "TrainResult",
    "TrainingConfig",
    "__version__",
    "hookimpl",
    "train",
]

_LAZY = {
    "hookimpl": ("posttrain.hookspecs", "hookimpl"),
    "Callback": ("posttrain._method", "Callback"),
    "LossOutput": ("posttrain._method", "LossOutput"),
    "Method": ("posttrain._method", "Method"),
    "Metric": ("posttrain._method", "Metric"),
    "TrainContext": ("posttrain._method", "TrainContext"),
    "TrainOutcome": ("posttrain._method", "TrainOutcome"),
    "TrainingConfig": ("posttrain.config", "TrainingConfig"),
    "TrainResult": ("posttrain.loop", "TrainResult"),
    "train": ("posttrain.loop", "train"),
}


def __getattr__(name: str) -> object:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("posttrain")
        except PackageNotFoundError:  # running from a source tree
            return "0.0.0"
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
