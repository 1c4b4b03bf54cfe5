"""TPO data: triple-preference rows (prompt, chosen, rejected, reference), validated, tokenized and collated.

``reference`` (the gold completion) is not one of core's standard formats, so it is validated here as
:class:`~posttrain.RowProblem` values, in the same message style as the other columns. Tokenization follows TRL 1.16:
prompt and prompt+completion are tokenized separately and split where they diverge; standard rows get the EOS
text appended to each completion.
"""

from __future__ import annotations

from typing import Any

import torch
from posttrain import DataError, RowProblem
from posttrain.data import apply_chat_template, extract_prompt, is_conversational, validate

COMPLETIONS = ("chosen", "rejected", "reference")


def _reference_problem(row: dict, index: int) -> RowProblem | None:
    value = row.get("reference")
    if value is None:
        return RowProblem(
            index,
            "reference",
            "is missing",
            "TPO reads prompt, chosen, rejected and reference (the gold completion) on every row.",
        )
    if isinstance(value, list):
        if not value or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value
        ):
            return RowProblem(index, "reference", "must be a non-empty list of {'role', 'content'} messages")
        if not isinstance(row.get("chosen"), list):
            return RowProblem(
                index,
                "reference",
                "is a list of messages but 'chosen' is a string",
                "Use the same kind (strings or messages) in every column.",
            )
        return None
    if not isinstance(value, str):
        return RowProblem(
            index, "reference", f"must be a string or a list of messages, got {type(value).__name__} {value!r}"
        )
    if not value.strip():
        return RowProblem(index, "reference", "is empty", "Fill in the gold completion or remove the row.")
    if isinstance(row.get("chosen"), list):
        return RowProblem(
            index,
            "reference",
            "is a string but 'chosen' is a list of messages",
            "Use the same kind (strings or messages) in every column.",
        )
    return None


def _implicit_prompt_problem(row: dict, index: int) -> RowProblem | None:
    """Without a ``prompt`` column, ``reference`` must start with the prompt that chosen and rejected share."""
    if row.get("prompt") is not None:
        return None
    prompt = extract_prompt(row)["prompt"]
    if row["reference"][: len(prompt)] == prompt:
        return None
    return RowProblem(
        index,
        "reference",
        "does not start with the prompt shared by 'chosen' and 'rejected'",
        "Add an explicit 'prompt' column, or begin 'reference' with the same prompt.",
    )


def row_problems(dataset: Any, source: str = "the dataset") -> list[RowProblem]:
    """Every bad row: core's preference checks plus the ``reference`` column, in row order.

    ``TPO.check_rows`` reports these for ``posttrain check-data``, and :func:`prepare_rows` refuses exactly these rows.
    """
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset[0])
    if "reference" not in columns:
        return [
            RowProblem(
                0,
                "reference",
                f"is missing: {source} has columns {columns}",
                "TPO reads prompt, chosen, rejected and reference (the gold completion).",
            )
        ]
    problems = validate(dataset, ("preference",), source)
    reported = {p.row for p in problems}
    for i, row in enumerate(dataset):
        problem = _reference_problem(row, i)
        if problem is None and i not in reported:  # the implicit prompt needs usable chosen and rejected
            problem = _implicit_prompt_problem(row, i)
        if problem:
            problems.append(problem)
    return sorted(problems, key=lambda p: p.row)  # stable: core's problems of a row come first


def split_prompt(row: dict, index: int) -> dict:
    """An explicit-prompt row; an implicit prompt is taken from chosen/rejected and stripped from reference too.

    Raises:
        DataError: ``reference`` does not start with the implicit prompt (:func:`row_problems` reports it first).
    """
    if row.get("prompt") is not None:
        return row
    problem = _implicit_prompt_problem(row, index)
    if problem:
        raise DataError(problem, method="tpo")
    out = extract_prompt(row)
    return {**out, "reference": row["reference"][len(out["prompt"]) :]}


# Copied from posttrain_bco.data.common_prefix_length
def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_triple(tokenizer: Any, row: dict) -> dict[str, list[int]]:
    """``prompt_ids`` and the ``chosen_ids``/``rejected_ids``/``reference_ids`` that follow it."""
    conversational = is_conversational(row)
    full = {}
    if conversational:
        prompt_ids = tokenizer(
            apply_chat_template(tokenizer, row["prompt"], add_generation_prompt=True), add_special_tokens=False
        ).input_ids
        for key in COMPLETIONS:
            text = apply_chat_template(tokenizer, row["prompt"] + row[key])
            full[key] = tokenizer(text, add_special_tokens=False).input_ids
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(row["prompt"]).input_ids
        for key in COMPLETIONS:
            completion = row[key] if row[key].endswith(eos) else row[key] + eos
            full[key] = tokenizer(row["prompt"] + completion).input_ids
    # the completion starts where prompt and prompt+completion diverge (a token may merge across the boundary)
    split = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    return {"prompt_ids": prompt_ids[:split], **{f"{key}_ids": full[key][split:] for key in COMPLETIONS}}


def prepare_rows(dataset: Any, tokenizer: Any, source: str = "the dataset") -> list[dict]:
    """Validate every row, then tokenize.

    Raises:
        DataError: carrying the :class:`~posttrain.RowProblem` of every bad row (:func:`row_problems`).
    """
    problems = row_problems(dataset, source)
    if problems:
        raise DataError(problems, method="tpo")
    return [tokenize_triple(tokenizer, split_prompt(dict(row), i)) for i, row in enumerate(dataset)]


def collate_rows(
    rows: list[dict],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    include_reference: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-padded [all chosen; all rejected; all reference] sequences (reference only when included).

    Each prompt+completion sequence is truncated to ``max_length`` before padding, keeping its start or its end.

    Returns:
        ``input_ids``, ``attention_mask``, ``completion_mask``: (n * B, T) with n = 3 (or 2 without reference).
    """
    keys = COMPLETIONS if include_reference else COMPLETIONS[:2]
    seqs, masks = [], []
    for key in keys:
        for row in rows:
            seqs.append(row["prompt_ids"] + row[f"{key}_ids"])
            masks.append([0] * len(row["prompt_ids"]) + [1] * len(row[f"{key}_ids"]))
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        seqs, masks = [s[cut] for s in seqs], [m[cut] for m in masks]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
