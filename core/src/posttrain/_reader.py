"""One reader and one set of checks for dataset files, shared by ``posttrain train`` and ``posttrain check-data``.

Both commands read a local JSON, JSONL or CSV file with :func:`read_file` and check it with
:func:`problems_and_warnings`, so they agree on every file by construction.

- **Decoding**: UTF-8 (a byte-order mark is skipped) or UTF-16/UTF-32 with a byte-order mark. A line that
  is not UTF-8 is a bad row; the other rows are still read and checked.
- **Layout**: ``.jsonl``, and ``.json`` files that do not start with ``[``, hold one JSON object per line
  (blank lines are skipped); a ``.json`` file that starts with ``[`` is one array of row objects. CSV
  has a header line, and every cell is text.
- **Types are kept**: values are what the JSON says, so ``"14"`` stays a string and ``14`` a number. A
  column holding different types in different rows is a row problem, never a silent conversion.
- **Row numbering**: rows count from 0 in file order. A JSONL row's number is its index among the
  non-blank lines, a bad line included; messages also give the 1-based line number editors show.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from posttrain._errors import DataError, PluginError, RowProblem

READERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}  # read here; other formats go through `datasets`
_JSONL_FIX = 'Each line must be one JSON object, e.g. {"prompt": "...", "completion": "..."}; fix or remove the line.'


class Table:
    """Rows read from a file, with the file's row number of each and the problems found while reading."""

    def __init__(self, rows: list[dict], numbers: list[int], problems: list[RowProblem], source: str):
        self.rows, self.numbers, self.problems, self.source = rows, numbers, problems, source

    def __len__(self) -> int:
        return len(self.numbers) + len({p.row for p in self.problems if p.row >= 0})


def is_readable_here(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in READERS and p.is_file()


def read_file(path: str | Path) -> Table:
    """Every row of a JSON/JSONL/CSV file; bad lines become :class:`RowProblem` values, never exceptions.

    Raises :class:`DataError` only when the file as a whole cannot be read (missing, empty, undecodable).
    """
    p = Path(path)
    source = str(path)
    if not p.is_file():
        raise DataError(f"dataset file {source!r} does not exist. Check the path (relative to {Path.cwd()}).")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"dataset file {source!r} is empty; it needs at least one row.")
    lines = _decoded_lines(raw, source)
    if READERS[p.suffix.lower()] == "csv":
        table = _csv_rows(lines, source)
    elif p.suffix.lower() == ".json" and _first_text(lines).startswith("["):
        table = _array_rows(lines, source)
    else:
        table = _jsonl_rows(lines, source)
    if not table.rows and not table.problems:
        raise DataError(f"dataset file {source!r} has no rows; write one JSON object per line (JSONL).")
    from posttrain.vision import IMAGE_COLUMNS, resolve_image_paths

    if any(column in row for row in table.rows for column in IMAGE_COLUMNS):
        table.rows = resolve_image_paths(table.rows, p.parent)  # image paths are relative to the dataset file
    return table


def _decoded_lines(raw: bytes, source: str) -> list[tuple[int, str, str]]:
    """(line number, text, why it is not UTF-8 or "") for every line of the file."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if raw.startswith(bom):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"dataset file {source!r} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} ({exc.reason} at byte {exc.start}); save it as UTF-8."
                ) from None
            return [(n, line, "") for n, line in enumerate(text.splitlines(), 1)]
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    if b"\x00" in raw:
        raise DataError(
            f"dataset file {source!r} holds NUL bytes, so it is probably UTF-16 or UTF-32 without a byte-order "
            "mark (or not text at all); save it as UTF-8."
        )
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            out.append((n, line.rstrip(b"\r").decode("utf-8"), ""))
        except UnicodeDecodeError as exc:  # kept (with U+FFFD) so CSV rows stay aligned; reported as a bad row
            reason = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
            out.append((n, line.rstrip(b"\r").decode("utf-8", errors="replace"), reason))
    return out


def _first_text(lines: list[tuple[int, str, str]]) -> str:
    return next((text.lstrip() for _, text, _ in lines if text.strip()), "")


def _not_utf8(row: int, line: int, reason: str) -> RowProblem:
    return RowProblem(row, "", f"line {line} is not UTF-8 text ({reason})", "Save the file as UTF-8.")


def _jsonl_rows(lines: list[tuple[int, str, str]], source: str) -> Table:
    rows, numbers, problems = [], [], []
    row = 0
    for number, text, reason in lines:
        if not text.strip():
            continue  # blank lines are not rows
        if reason:
            problems.append(_not_utf8(row, number, reason))
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(
                    RowProblem(
                        row, "", f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})", _JSONL_FIX
                    )
                )
            else:
                if isinstance(value, dict):
                    rows.append(value)
                    numbers.append(row)
                else:
                    problems.append(
                        RowProblem(row, "", f"line {number} is a JSON {_kind(value)}, not an object", _JSONL_FIX)
                    )
        row += 1
    if len(problems) == row and row > 1 and _first_text(lines).startswith("{"):
        # every line bad and the file opens with "{": one pretty-printed JSON document, not rows
        problems = [
            RowProblem(
                -1,
                "",
                "is one JSON document spread over several lines, not one row per line",
                "Write one JSON object per line (JSONL), or a .json file holding an array of row objects.",
            )
        ]
    return Table(rows, numbers, problems, source)


def _array_rows(lines: list[tuple[int, str, str]], source: str) -> Table:
    bad = [(n, reason) for n, _, reason in lines if reason]
    if bad:
        n, reason = bad[0]
        problem = f"line {n} is not UTF-8 text ({reason})" + (
            f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else ""
        )
        return Table([], [], [RowProblem(-1, "", problem, "Save the file as UTF-8.")], source)
    text = "\n".join(t for _, t, _ in lines)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        return Table(
            [],
            [],
            [
                RowProblem(
                    -1,
                    "",
                    f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                    "Fix that line; a .json file holds one array of row objects (or use JSONL, one object per line).",
                )
            ],
            source,
        )
    rows, numbers, problems = [], [], []
    for i, value in enumerate(values if isinstance(values, list) else [values]):
        if isinstance(value, dict):
            rows.append(value)
            numbers.append(i)
        else:
            problems.append(
                RowProblem(i, "", f"is a JSON {_kind(value)}, not an object", "Each array item must be a row object.")
            )
    return Table(rows, numbers, problems, source)


def _csv_rows(lines: list[tuple[int, str, str]], source: str) -> Table:
    import csv

    bad = {n: reason for n, _, reason in lines if reason}
    reader = csv.reader(text for _, text, _ in lines)
    rows, numbers, problems = [], [], []
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise DataError(
            f"dataset file {source!r} has no readable CSV header line ({exc}); the first line names the columns."
        ) from None
    if 1 in bad:
        raise DataError(f"the header line of {source!r} is not UTF-8 text ({bad[1]}); save the file as UTF-8.")
    row, last_line = 0, reader.line_num
    try:
        for cells in reader:
            spanned = range(last_line + 1, reader.line_num + 1)  # a quoted cell may span several lines
            last_line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            undecodable = [n for n in spanned if n in bad]
            if undecodable:
                problems.append(_not_utf8(row, undecodable[0], bad[undecodable[0]]))
            elif len(cells) != len(header):
                problems.append(
                    RowProblem(
                        row,
                        "",
                        f"line {spanned[0]} has {len(cells)} cells but the header has {len(header)}",
                        "Quote cells that contain commas, and give every row one cell per column.",
                    )
                )
            else:
                rows.append(dict(zip(header, cells)))
                numbers.append(row)
            row += 1
    except csv.Error as exc:
        problems.append(RowProblem(row, "", f"is not valid CSV ({exc})", "Fix the quoting of that row."))
    return Table(rows, numbers, problems, source)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def mixed_type_problems(rows: Any, numbers: list[int] | None = None) -> list[RowProblem]:
    """Rows whose value in a column has another type than the column's first value (nulls aside)."""
    first: dict[str, tuple[str, int]] = {}
    problems = []
    for i, row in enumerate(rows):
        number = numbers[i] if numbers is not None else i
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (kind, number))
            if seen[0] != kind:
                example = f"write {json.dumps(str(value))}" if seen[0] == "string" else "use one type"
                problems.append(
                    RowProblem(
                        number,
                        column,
                        f"is a {kind} ({value!r:.40}) but a {seen[0]} in row {seen[1]}",
                        f"A column holds one type in every row; {example} (nothing is converted for you).",
                    )
                )
    return problems


def problems_and_warnings(method: Any, table: Any, source: str) -> tuple[list[RowProblem], list[RowProblem]]:
    """Every problem of a dataset for ``method`` (a class or instance), in row order, and its warnings.

    ``table`` is a :class:`Table` (a file read here) or a dataset (rows in order). The checks: what the reader
    found, core's format checks, the method's ``check_rows``, columns with mixed types; then the warnings
    (:func:`degenerate_rows`). The same (row, field) is reported once.
    """
    from posttrain import data

    rows = table.rows if isinstance(table, Table) else table
    numbers = table.numbers if isinstance(table, Table) else None
    found = list(table.problems) if isinstance(table, Table) else []
    formats = tuple(getattr(method, "dataset_formats", ()) or ())
    if rows and len(rows):
        found += _renumber(image_support_problems(method, rows), numbers)
        if formats:
            found += _renumber(data.validate(rows, formats, source), numbers)
        found += _renumber(method_row_problems(method, rows), numbers)
        if isinstance(table, Table):  # Arrow-backed datasets are typed per column already
            found += mixed_type_problems(rows, numbers)
    seen: set[tuple[int, str]] = set()
    unique = []
    for problem in found:
        key = (problem.row, problem.field)
        if key not in seen:
            seen.add(key)
            unique.append(problem)
    unique.sort(key=lambda q: q.row)
    warned = _renumber(degenerate_rows(rows), numbers) if rows and len(rows) else []
    bad = {q.row for q in unique}
    return unique, [w for w in warned if w.row not in bad]


def image_support_problems(method: Any, rows: Any) -> list[RowProblem]:
    """The first row with images, when ``method`` does not declare ``supports_images``: it trains on text only,
    so the images would be dropped without a word."""
    from posttrain.vision import IMAGE_COLUMNS, row_images

    if getattr(method, "supports_images", False) is True:
        return []
    columns = rows.column_names if hasattr(rows, "column_names") else {k for r in rows for k in r}
    if not set(IMAGE_COLUMNS) & set(columns):
        return []
    first = next((i for i, row in enumerate(rows) if row_images(row)), None)
    if first is None:
        return []
    name = getattr(method, "name", None) or type(method).__name__
    column = "images" if rows[first].get("images") is not None else "image"
    return [
        RowProblem(
            first,
            column,
            f"holds images, but method {name!r} trains on text only (it does not declare supports_images)",
            "Use a method that accepts images (`posttrain info METHOD` says which: sft, dpo, grpo), or drop the "
            f"{column!r} column.",
        )
    ]


def _renumber(problems: list[RowProblem], numbers: list[int] | None) -> list[RowProblem]:
    if numbers is None:
        return problems
    return [RowProblem(numbers[q.row], q.field, q.problem, q.fix) if 0 <= q.row < len(numbers) else q for q in problems]


def method_row_problems(method: Any, rows: Any) -> list[RowProblem]:
    """The method's own ``check_rows``, held to the contract: a list of RowProblem values."""
    from posttrain._method import optional_member

    cls = method if isinstance(method, type) else type(method)
    check_rows = optional_member(method() if isinstance(method, type) else method, "check_rows")
    if check_rows is None:
        return []
    found = list(check_rows(rows))
    wrong = [item for item in found if not isinstance(item, RowProblem)]
    if wrong:
        raise PluginError(
            f"{cls.__module__}.{cls.__qualname__}.check_rows returned {type(wrong[0]).__name__} {wrong[0]!r}; the "
            "Method protocol asks for posttrain.RowProblem values (row, field, problem, fix). Update the plugin."
        )
    return found


def degenerate_rows(rows: Any) -> list[RowProblem]:
    """Rows that are valid but teach nothing: a preference pair whose chosen equals its rejected.

    Such a pair gives every pairwise loss exactly zero gradient (the two log-probabilities are the same
    number) while it still counts in the normalisation, so it silently dilutes the batch. They are
    warnings, not errors: training goes on, and the warning names the rows to remove.
    """
    out = []
    for i, row in enumerate(rows):
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if chosen is not None and chosen == rejected:
            out.append(
                RowProblem(
                    i,
                    "chosen/rejected",
                    "are identical, so the pair carries no preference (zero gradient)",
                    "Remove the row or fix one of the answers.",
                )
            )
    return out


def warn_degenerate(warnings_found: list[RowProblem], source: str) -> None:
    """One warning naming the rows (the first ten) that :func:`degenerate_rows` found."""
    if not warnings_found:
        return
    import warnings

    rows = ", ".join(str(w.row) for w in warnings_found[:10]) + (" ..." if len(warnings_found) > 10 else "")
    first = warnings_found[0]
    warnings.warn(
        f"{source}: {len(warnings_found)} row(s) have field {first.field!r} {first.problem} (rows {rows}; rows count "
        f"from 0). They are trained on but cannot change the model. {first.fix}",
        UserWarning,
        stacklevel=3,
    )


def to_dataset(table: Table):
    """A ``datasets.Dataset`` of the table's rows (types as read; call after the checks found nothing)."""
    import datasets

    try:
        return datasets.Dataset.from_list(table.rows)
    except Exception as exc:  # pyarrow cannot hold a value the checks did not flag
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot turn the rows of {table.source!r} into a dataset ({reason}); a column probably holds "
            "values of different shapes in different rows. Give each column one type."
        ) from None


def load_checked(method: Any, source: Any, split: str = "train"):
    """The dataset ``source`` names, read and checked exactly as ``posttrain check-data`` does.

    Raises :class:`DataError` carrying every problem (with the file and the method in its message); warns
    once about degenerate rows; returns a ``datasets.Dataset`` for ``method.prepare``.
    """
    from posttrain import data

    path = str(source) if isinstance(source, (str, Path)) else None
    table = read_file(path) if path and is_readable_here(path) else data.load_dataset(source, split)
    problems, warned = problems_and_warnings(method, table, path or "the dataset")
    if problems:
        raise DataError(problems, source=path, method=getattr(method, "name", None))
    warn_degenerate(warned, path or "the dataset")
    return to_dataset(table) if isinstance(table, Table) else table
