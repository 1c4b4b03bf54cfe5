"""Dataset loading and the standard dataset formats, with row-level validation.

Formats (TRL's names and columns, so TRL datasets work unchanged); each row is *standard* (strings)
or *conversational* (lists of ``{"role", "content"}`` messages):

=====================  ==============================================  ===============
format                 columns                                         used by
=====================  ==============================================  ===============
language_modeling      ``text`` or ``messages``                        SFT
prompt_only            ``prompt``                                      GRPO, RLOO, distillation
prompt_completion      ``prompt``, ``completion``                      SFT, distillation
preference             ``prompt``?, ``chosen``, ``rejected``           DPO, reward, ORPO, CPO
unpaired_preference    ``prompt``, ``completion``, ``label`` (bool)    KTO, BCO
=====================  ==============================================  ===============

A preference row without ``prompt`` is *implicit*: the prompt is the common prefix of chosen and
rejected (:func:`extract_prompt`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from posttrain import _reader
from posttrain._errors import DataError, RowProblem

__all__ = [
    "FORMAT_COLUMNS",
    "ROLES",
    "RowProblem",
    "apply_chat_template",
    "check",
    "detect_format",
    "extract_prompt",
    "is_conversational",
    "load_dataset",
    "row_problems",
    "validate",
]

ROLES = ("system", "user", "assistant", "tool", "developer")
"""Message roles a conversational row may use.

.. versionadded:: 0.1
"""
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    # each alternative is a set of required columns
    "language_modeling": (("text",), ("messages",)),
    "prompt_only": (("prompt",),),
    "prompt_completion": (("prompt", "completion"),),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "unpaired_preference": (("prompt", "completion", "label"),),
}
"""Format name -> the alternative sets of required columns (TRL's formats and column names).

.. versionadded:: 0.1
"""
_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_dataset(path_or_name: Any, split: str = "train"):
    """Load a ``datasets.Dataset`` from a local file, a saved directory, a Dataset or a hub name.

    Raises :class:`DataError` naming the path for a missing, empty or unreadable file. Relative image paths in
    a file's ``images``/``image`` column are made absolute against the file's directory.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 image paths are resolved against the dataset file's directory.
    """
    import datasets

    if isinstance(path_or_name, datasets.Dataset):
        return path_or_name
    if isinstance(path_or_name, datasets.DatasetDict):
        if split not in path_or_name:
            raise DataError(f"dataset has no split {split!r}; it has {', '.join(path_or_name)}")
        return path_or_name[split]
    if isinstance(path_or_name, list):
        return datasets.Dataset.from_list(path_or_name)
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path} is a directory but not a dataset saved with `save_to_disk`: {exc}") from None
        return load_dataset(loaded, split)
    if path.suffix.lower() in _SUFFIXES or path.exists() or ("/" not in text and "." in text):
        if not path.is_file():
            raise DataError(f"dataset file {text!r} does not exist. Check the path (relative to {Path.cwd()}).")
        if path.stat().st_size == 0:
            raise DataError(f"dataset file {text!r} is empty; it needs at least one row.")
        builder = _SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"cannot tell the format of {text!r}; use .json, .jsonl, .csv or .parquet")
        if _reader.is_readable_here(path):  # JSON, JSONL, CSV: the reader `posttrain check-data` uses too
            table = _reader.read_file(text)
            problems = table.problems + _reader.mixed_type_problems(table.rows, table.numbers)
            if problems:
                raise DataError(sorted(problems, key=lambda q: q.row), source=text)
            return _reader.to_dataset(table)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"cannot read dataset file {text!r} as {builder}: {reason}. Check that the file is valid {builder}."
            ) from None
        if len(ds) == 0:
            raise DataError(f"dataset file {text!r} has no rows.")
        from posttrain.vision import resolve_image_paths

        return resolve_image_paths(ds, path.parent)  # image paths are relative to the dataset file
    if text.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir()):
        raise DataError(  # a path, not a hub name: never a hub lookup for a typo
            f"dataset path {text!r} does not exist (relative to {Path.cwd()}). Check the path; a file needs its "
            "extension (.jsonl, .json, .csv, .parquet)."
        )
    from posttrain._preflight import hub_unavailable, offline_mode

    reason = None if offline_mode() else hub_unavailable()  # offline mode reads the cache, quickly
    if reason is not None:  # fail in a second, not after a minute of retries
        raise DataError(
            f"dataset {text!r} is not a local file or directory (none at {Path.cwd() / text}), and as a hub name it "
            f"cannot be downloaded: {reason}. Check the path; for a cached hub dataset set HF_HUB_OFFLINE=1."
        )
    try:  # a hub name; in offline mode from the cache only (the libraries read the variable at import)
        with _offline(offline_mode() is not None):
            return datasets.load_dataset(text, split=split)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load dataset {text!r} (not a local file or directory, so tried as a hub name): {reason}. "
            "Check the path or the dataset name."
        ) from None


@contextlib.contextmanager
def _offline(on: bool):
    """Hold ``datasets`` and ``huggingface_hub`` to offline mode when the environment asks for it, even when they
    were imported before the variable was set."""
    if not on:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved[:2]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved[2]


def is_conversational(row: dict) -> bool:
    """Whether a row holds message lists (``[{"role", "content"}, ...]``) rather than plain strings.

    .. versionadded:: 0.1
    """
    for key in ("prompt", "chosen", "rejected", "completion", "messages"):
        value = row.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return True
    return False


def detect_format(columns: list[str] | set[str]) -> str | None:
    """The most specific standard format whose columns are all present.

    .. versionadded:: 0.1
    """
    cols = set(columns)
    for fmt in ("unpaired_preference", "preference", "prompt_completion", "language_modeling", "prompt_only"):
        if any(set(alt) <= cols for alt in FORMAT_COLUMNS[fmt]):
            return fmt
    return None


def _check_messages(value: Any, row: int, column: str) -> RowProblem | None:
    if not isinstance(value, list) or not value:
        return RowProblem(
            row, column, "must be a non-empty list of messages", 'Each message is {"role": ..., "content": ...}.'
        )
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return RowProblem(
                row,
                column,
                f"message {j} is not a {{'role', 'content'}} mapping: {message!r}",
                'Each message is {"role": ..., "content": ...}.',
            )
        if message["role"] not in ROLES:
            return RowProblem(
                row, column, f"message {j} has unknown role {message['role']!r}", f"Use one of: {', '.join(ROLES)}."
            )
        content = message["content"]
        if isinstance(content, list) and all(_is_part(part) for part in content):
            continue  # content parts: [{"type": "text", "text": ...}, {"type": "image"}] (vision-language rows)
        if not isinstance(content, str):
            return RowProblem(
                row,
                column,
                f"message {j} has non-string content {content!r} that is not a list of content parts either",
                'Write the content as a string, or as parts [{"type": "text", "text": "..."}, {"type": "image"}].',
            )
    return None


def _is_part(part: Any) -> bool:
    """A content part of a multimodal message: ``{"type": "text", "text": str}`` or ``{"type": "image", ...}``."""
    if not isinstance(part, dict):
        return False
    if part.get("type") == "text":
        return isinstance(part.get("text"), str)
    return part.get("type") == "image"


def _check_text(value: Any, row: int, column: str, allow_empty: bool = False) -> RowProblem | None:
    if isinstance(value, list):
        return _check_messages(value, row, column)
    if not isinstance(value, str):
        return RowProblem(
            row,
            column,
            f"must be a string or a list of messages, got {type(value).__name__} {value!r}",
            'Write it as a JSON string (in quotes) or as a list of {"role": ..., "content": ...} messages.',
        )
    if not allow_empty and not value.strip():
        return RowProblem(row, column, "is empty", "Remove the row or fill in the field.")
    return None


def row_problems(row: dict, index: int, fmt: str) -> list[RowProblem]:
    """Everything wrong with one row for ``fmt``; a row with images also gets
    :func:`posttrain.vision.image_problems` (missing or unreadable files, images vs placeholders).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 content-part messages and image checks.
    """
    alternatives = FORMAT_COLUMNS[fmt]
    present = {k for k, v in row.items() if v is not None}
    if not any(set(alt) <= present for alt in alternatives):
        # the alternative this row is closest to: fewest missing columns, then the smaller set
        best = min(alternatives, key=lambda alt: (len(set(alt) - present), len(alt)))
        missing = [c for c in best if c not in present]
        need = " or ".join("+".join(alt) for alt in alternatives)
        return [RowProblem(index, missing[0], "is missing", f"The {fmt} format needs {need}.")]
    problems: list[RowProblem] = []
    for column in ("text", "messages", "prompt", "completion", "chosen", "rejected"):
        if column in present:
            if column == "messages":
                p = _check_messages(row[column], index, column)
            else:
                p = _check_text(row[column], index, column, allow_empty=column == "prompt" and fmt == "preference")
            if p:
                problems.append(p)
    if fmt == "unpaired_preference" and "label" in present and not isinstance(row["label"], bool):
        problems.append(
            RowProblem(
                index, "label", f"must be true or false, got {row['label']!r}", "Write the JSON literal true or false."
            )
        )
    if not problems and present & {"images", "image"}:
        from posttrain.vision import image_problems

        problems += image_problems(row, index)
    return problems


def validate(
    dataset: Any, formats: tuple[str, ...] | str, source: str = "the dataset", limit: int | None = None
) -> list[RowProblem]:
    """Check every row against the first of ``formats`` the columns match; return all problems.

    .. versionadded:: 0.1
    """
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if hasattr(dataset, "column_names"):
        columns = list(dataset.column_names)
    else:  # rows as read from a file: every column any row has, in first-seen order (as `datasets` would)
        columns = list(dict.fromkeys(key for row in dataset for key in row))
    fmt = next((f for f in formats if any(set(alt) <= set(columns) for alt in FORMAT_COLUMNS[f])), None)
    if fmt is None:
        need = "; ".join(f"{f}: " + " or ".join("+".join(a) for a in FORMAT_COLUMNS[f]) for f in formats)
        detected = detect_format(columns)
        seen = f" (it looks like {detected} data)" if detected else ""
        return [
            RowProblem(
                0,
                "/".join(FORMAT_COLUMNS[formats[0]][0]),
                f"is missing: {source} has columns {columns}{seen}",
                f"This method reads {need}.",
            )
        ]
    problems: list[RowProblem] = []
    for i, row in enumerate(dataset):
        problems.extend(row_problems(row, i, fmt))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def check(dataset: Any, formats: tuple[str, ...] | str, source: str | None = None) -> None:
    """Raise :class:`DataError` carrying every bad row's :class:`RowProblem` (its message names the first).

    .. versionadded:: 0.1
    """
    problems = validate(dataset, formats, source or "the dataset")
    if problems:
        raise DataError(problems, source=source)


def extract_prompt(row: dict) -> dict:
    """Split an implicit-prompt preference row into prompt / chosen / rejected.

    Conversational: the prompt is the longest common prefix of messages. Standard: the longest
    common prefix of the strings, with a space just before the first difference moved into the
    answers (``"The sky is"`` / ``" blue"``), as TRL splits them.

    .. versionadded:: 0.1
    """
    if "prompt" in row and row["prompt"] is not None:
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and chosen[n - 1] == " ":  # the space before the answers belongs to them (as TRL splits)
        n -= 1
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """Render messages with the tokenizer's chat template; a clear error when it has none.

    .. versionadded:: 0.1
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the dataset is conversational but the tokenizer has no chat template; "
            "set tokenizer.chat_template (for example in tokenizer_config.json) or use standard (string) rows."
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
