"""Exceptions and warnings users see. Imports nothing heavy."""

from __future__ import annotations


class PosttrainError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


class ConfigError(PosttrainError, ValueError):
    """A configuration problem (unknown key, wrong type, contradictory options).

    Carries every problem found, so a user fixes them all in one go.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid configuration{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class DataError(PosttrainError, ValueError):
    """A dataset problem; the message names the file, the row and the field."""


class PluginError(PosttrainError):
    """A plugin cannot be used: unknown, broken, incompatible, inactive or in conflict."""


class ExperimentalWarning(FutureWarning):
    """Emitted once per method and process when an experimental method is used.

    Silence all with ``POSTTRAIN_EXPERIMENTAL_SILENCE=1``, some with
    ``POSTTRAIN_EXPERIMENTAL_SILENCE=kto,orpo``, or filter
    ``-W ignore::posttrain.ExperimentalWarning``.
    """


ExperimentalWarning.__module__ = "posttrain"
PosttrainError.__module__ = "posttrain"
ConfigError.__module__ = "posttrain"
DataError.__module__ = "posttrain"
PluginError.__module__ = "posttrain"
