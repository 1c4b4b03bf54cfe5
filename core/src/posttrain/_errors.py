"""Exceptions, warnings and row problems users see. Imports nothing but the standard library."""

from __future__ import annotations


class PosttrainError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback.

    .. versionadded:: 0.1
    """


class ConfigError(PosttrainError, ValueError):
    """A configuration problem (unknown key, wrong type, contradictory options).

    Carries every problem found, so a user fixes them all in one go.

    .. versionadded:: 0.1
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


class RowProblem:
    """One bad row: where, which field, what is wrong, how to fix it.

    Methods return these from ``check_rows`` and raise them inside :class:`DataError`; the message is
    formatted once, at the edge (``posttrain check-data`` lists them, ``train`` names the file).

    Attributes:
        row: index of the row in the dataset, counted from 0 in file order (``-1``: the dataset as a whole).
        field: the column (``"chosen"``), or ``"/"``-joined columns when several are involved.
        problem: what is wrong, phrased to follow "field 'x' ..." (``"is missing"``, ``"is empty"``).
        fix: how to fix it, a full sentence (may be empty).

    .. versionadded:: 1.0 (in ``posttrain.data`` since 0.1)
    """

    __slots__ = ("field", "fix", "problem", "row")  # a plain class: dataclasses would slow `posttrain list`

    def __init__(self, row: int, field: str, problem: str, fix: str = ""):
        self.row, self.field, self.problem, self.fix = row, field, problem, fix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowProblem) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.row, self.field, self.problem, self.fix))

    def __repr__(self) -> str:
        return f"RowProblem(row={self.row!r}, field={self.field!r}, problem={self.problem!r}, fix={self.fix!r})"

    def as_dict(self) -> dict:
        return {"row": self.row, "field": self.field, "problem": self.problem, "fix": self.fix}

    def message(self, source: str = "the dataset") -> str:
        where = f"row {self.row} of {source}" if self.row >= 0 else source
        text = f"{where}: field {self.field!r} {self.problem}" if self.field else f"{where}: {self.problem}"
        return f"{text}. {self.fix}" if self.fix else text


class DataError(PosttrainError, ValueError):
    """A dataset problem. Carries the :class:`RowProblem` values it is about, when it is about rows.

    ``DataError("text")`` for a problem with the file as a whole; ``DataError(problems)`` for bad rows:
    the message names the first one, how many more there are, and the ``check-data`` command that lists
    them all. :meth:`for_source` re-formats it for a named file and method (the loop does this), so no
    message is ever rewritten or parsed.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 carries :class:`RowProblem` values (``problems``) instead of only a message.
    """

    def __init__(
        self, problems: str | RowProblem | list[RowProblem], *, source: str | None = None, method: str | None = None
    ):
        if isinstance(problems, str):
            self.problems: list[RowProblem] = []
            self.text: str | None = problems
        else:
            self.problems = [problems] if isinstance(problems, RowProblem) else list(problems)
            self.text = None
        self.source, self.method = source, method
        super().__init__(self._message())

    def _message(self) -> str:
        if self.text is not None:
            return f"{self.source}: {self.text}" if self.source and self.source not in self.text else self.text
        if not self.problems:
            return f"{self.source or 'the dataset'} has a problem that was not described"
        source = self.source or "the dataset"
        text = self.problems[0].message(source).rstrip(".") + "."
        more = len(self.problems) - 1
        if more:
            text += f" ({more} more problem{'s' if more > 1 else ''} in other rows.)"
        command = f"posttrain check-data {self.method or 'METHOD'} {self.source or 'FILE'}"
        return f"{text} Run `{command}` to list every bad row (rows count from 0, in file order)."

    def for_source(self, source: str, method: str | None = None) -> DataError:
        """The same error, naming ``source`` (a file) and ``method`` in its message and check-data hint."""
        again = DataError(
            self.problems if self.text is None else self.text, source=source, method=method or self.method
        )
        again.__cause__ = self.__cause__
        return again


class PluginError(PosttrainError):
    """A plugin cannot be used: unknown, broken, incompatible, inactive or in conflict.

    .. versionadded:: 0.1
    """


class ExperimentalWarning(FutureWarning):
    """Emitted once per method and process when an experimental method is used.

    Silence all with ``POSTTRAIN_EXPERIMENTAL_SILENCE=1``, some with
    ``POSTTRAIN_EXPERIMENTAL_SILENCE=kto,orpo``, or in code with
    ``warnings.filterwarnings("ignore", category=posttrain.ExperimentalWarning)``. Python's own
    ``-W ignore::posttrain.ExperimentalWarning`` (and ``PYTHONWARNINGS``) does *not* work: Python
    reads ``-W`` before site-packages can be imported, prints "Invalid -W option ignored" and drops
    the filter. ``-W ignore::FutureWarning`` works but hides every FutureWarning, deprecations of
    other libraries included.

    .. versionadded:: 0.1
    """


ExperimentalWarning.__module__ = "posttrain"
PosttrainError.__module__ = "posttrain"
ConfigError.__module__ = "posttrain"
DataError.__module__ = "posttrain"
PluginError.__module__ = "posttrain"
RowProblem.__module__ = "posttrain"
