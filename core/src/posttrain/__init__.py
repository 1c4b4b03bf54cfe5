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
)

TYPE_CHECKING = False  # not imported from typing: keeps `import posttrain` (and `posttrain list`) cheap
if TYPE_CHECKING:  # pragma: no cover
    from posttrain._method import LossOutput, Method, TrainContext
    from posttrain.config import TrainingConfig
    from posttrain.hookspecs import hookimpl

#: Version of the plugin API (hookspecs, the Method protocol, posttrain.testing).
#: Equal to core's ``major.minor``; plugins declare ``Requires-Dist: posttrain>=X.Y,<X+1``.
API_VERSION = "0.1"

__all__ = [
    "API_VERSION",
    "ConfigError",
    "DataError",
    "ExperimentalWarning",
    "LossOutput",
    "Method",
    "PluginError",
    "PosttrainError",
    "TrainContext",
    "TrainingConfig",
    "__version__",
    "hookimpl",
]

_LAZY = {
    "hookimpl": ("posttrain.hookspecs", "hookimpl"),
    "LossOutput": ("posttrain._method", "LossOutput"),
    "Method": ("posttrain._method", "Method"),
    "TrainContext": ("posttrain._method", "TrainContext"),
    "TrainingConfig": ("posttrain.config", "TrainingConfig"),
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
