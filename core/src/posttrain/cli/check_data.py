"""``posttrain check-data METHOD FILE``: every bad row of a dataset, before any model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain._errors import DataError, PluginError, RowProblem


def read_rows(path: str) -> list[dict]:
    """Rows of a JSON/JSONL file read with the standard library, so a malformed line is reported by
    number and mixed types reach the validator; other formats go through ``datasets``."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
        text = p.read_text()
        if not text.strip():
            raise DataError(f"dataset file {path!r} is empty; it needs at least one row.")
        if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}.") from None
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"line {number} of {path} (row {len(rows)}) is not valid JSON: {exc.msg}. "
                        "Each line must be one JSON object."
                    ) from None
        not_objects = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if not_objects:
            raise DataError(f"row {not_objects[0]} of {path} is not a JSON object (got {rows[not_objects[0]]!r}).")
        from posttrain.vision import resolve_image_paths

        return resolve_image_paths(rows, p.parent)  # as train reads them: relative to the dataset file
    from posttrain.data import load_dataset

    return load_dataset(path).to_list()


def _method_problems(method_class, rows: list[dict]) -> list[RowProblem]:
    """The method's own ``check_rows``, held to the contract: a list of RowProblem values."""
    from posttrain._method import optional_member

    check_rows = optional_member(method_class(), "check_rows")
    if check_rows is None:
        return []
    found = list(check_rows(rows))
    wrong = [item for item in found if not isinstance(item, RowProblem)]
    if wrong:
        raise PluginError(
            f"{method_class.__module__}.{method_class.__qualname__}.check_rows returned {type(wrong[0]).__name__} "
            f"{wrong[0]!r}; the Method protocol asks for posttrain.RowProblem values (row, field, problem, fix). "
            "Update the plugin."
        )
    return found


def _image_support_problems(method_class, name: str, rows: list[dict]) -> list[RowProblem]:
    """Rows with images for a method that does not declare ``supports_images``: the dataset as a whole is refused."""
    from posttrain.vision import IMAGE_COLUMNS, has_images

    if getattr(method_class, "supports_images", False) or not has_images(rows):
        return []
    column = next(c for c in IMAGE_COLUMNS if any(r.get(c) for r in rows))
    return [
        RowProblem(
            -1,
            column,
            f"holds images, but method {name!r} trains on text only (it does not declare supports_images)",
            "Use a method that accepts images (`posttrain info METHOD` says which), or drop the column.",
        )
    ]


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain check-data", description="Validate a dataset against a method's format; no model is loaded."
    )
    p.add_argument("method")
    p.add_argument("file")
    p.add_argument("--limit", type=int, default=None, help="stop after N problems")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    args = p.parse_args(argv)

    from posttrain import _registry as registry
    from posttrain.data import validate

    method_class, _ = registry.resolve_method(args.method, allow_inactive=True)
    formats = tuple(getattr(method_class, "dataset_formats", ()) or ())
    rows = read_rows(args.file)
    source = Path(args.file).name
    problems = validate(rows, formats, source, args.limit) if formats else []
    problems = _image_support_problems(method_class, args.method, rows) + problems
    if args.limit is None or len(problems) < args.limit:
        seen = {(q.row, q.field) for q in problems}
        extra = _method_problems(method_class, rows)
        problems += [q for q in extra if (q.row, q.field) not in seen and not seen.add((q.row, q.field))]
        problems.sort(key=lambda q: q.row)
    if args.limit is not None:
        problems = problems[: args.limit]
    bad_rows = sorted({q.row for q in problems if q.row >= 0})
    if args.json:
        print(
            json.dumps(
                {
                    "method": args.method,
                    "file": args.file,
                    "rows": len(rows),
                    "formats": list(formats),
                    "bad_rows": len(bad_rows),
                    "problems": [q.as_dict() for q in problems],
                },
                indent=2,
            )
        )
    else:
        for q in problems:
            print(q.message(source) if q.row >= 0 or q.field else q.problem)
        if problems:
            whole = " and a problem with the dataset as a whole" if any(q.row < 0 for q in problems) else ""
            print(
                f"\n{len(bad_rows)} bad row(s){whole} out of {len(rows)} in {args.file} for method {args.method!r} "
                f"(format: {' or '.join(formats)})."
            )
        else:
            print(f"ok: {len(rows)} rows of {args.file} match {args.method!r} ({' or '.join(formats)}).")
    return 1 if problems else 0
