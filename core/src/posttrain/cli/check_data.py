"""``posttrain check-data METHOD FILE``: every bad row of a dataset, before any model is loaded.

The file is read and checked by the same code ``posttrain train`` uses (:mod:`posttrain._reader`), so the two
commands agree on every file. Rows count from 0 in file order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain._errors import RowProblem


def _rows_of(path: str):
    from posttrain import _reader
    from posttrain.data import load_dataset

    return _reader.read_file(path) if _reader.is_readable_here(path) else load_dataset(path)


def _image_token_problems(table, processor_path: str, known: list[RowProblem]) -> list[RowProblem]:
    """Standard rows whose image tokens do not match their images, counted with the processor of
    ``processor_path`` (loaded without the model's weights); rows and fields already reported are skipped."""
    from posttrain import _reader
    from posttrain.models import load_processor
    from posttrain.vision import image_problems, row_images

    token = getattr(load_processor(processor_path), "image_token", None)
    if token is None:
        return []
    rows = table.rows if isinstance(table, _reader.Table) else table
    numbers = table.numbers if isinstance(table, _reader.Table) else None
    seen = {(q.row, q.field) for q in known}
    found = []
    for i, row in enumerate(rows):
        number = numbers[i] if numbers is not None else i
        if not row_images(row) or any(isinstance(row.get(c), list) for c in ("prompt", "messages", "chosen")):
            continue  # conversational rows count their {"type": "image"} parts without a processor
        for q in image_problems(row, number, token, open_files=False):
            if (q.row, q.field) not in seen:
                seen.add((q.row, q.field))
                found.append(q)
    return found


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain check-data", description="Validate a dataset against a method's format; no model is loaded."
    )
    p.add_argument("method")
    p.add_argument("file")
    p.add_argument("--limit", type=int, default=None, help="show at most N problems")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--processor",
        metavar="MODEL",
        default=None,
        help="a vision-language model directory: standard rows' image tokens are counted with its processor's token "
        "(the processor loads, the weights do not)",
    )
    args = p.parse_args(argv)

    from posttrain import _reader
    from posttrain import _registry as registry

    # no hook plugins: checking a file needs only the method's own package
    method_class, _ = registry.resolve_method(args.method, allow_inactive=True, hooks=False)
    method = registry.instantiate(method_class, args.method)
    formats = tuple(getattr(method_class, "dataset_formats", ()) or ())
    table = _rows_of(args.file)
    source = Path(args.file).name
    problems, warned = _reader.problems_and_warnings(method, table, source)
    if args.processor:
        problems = sorted(problems + _image_token_problems(table, args.processor, problems), key=lambda q: q.row)
    n_rows = len(table)
    shown = problems if args.limit is None else problems[: args.limit]
    bad_rows = sorted({q.row for q in problems if q.row >= 0})
    if args.json:
        print(
            json.dumps(
                {
                    "method": args.method,
                    "file": args.file,
                    "rows": n_rows,
                    "formats": list(formats),
                    "bad_rows": len(bad_rows),
                    "problems": [q.as_dict() for q in shown],
                    "warnings": [q.as_dict() for q in warned],
                },
                indent=2,
            )
        )
    else:
        for q in shown:
            print(q.message(source))
        for q in warned:
            print("warning: " + q.message(source))
        fmt = " or ".join(formats) or "not declared"
        if problems:
            more = (
                f" ({len(problems) - len(shown)} more not shown; drop --limit to see them)"
                if len(shown) < len(problems)
                else ""
            )
            print(
                f"\n{len(bad_rows)} bad row(s) out of {n_rows} in {args.file} for method {args.method!r} "
                f"(format: {fmt}; rows count from 0).{more}"
            )
        else:
            extra = f", {len(warned)} warning(s)" if warned else ""
            print(f"ok: {n_rows} rows of {args.file} match {args.method!r} ({fmt}){extra}.")
    return 1 if problems else 0
