"""Preference rows to token ids, and micro-batches that score chosen and rejected in one forward pass.

A prepared row is ``{"prompt_ids", "chosen_ids", "rejected_ids"}``. Rows may be standard (strings) or
conversational (message lists, rendered with the tokenizer's chat template); a row without ``prompt``
gets its implicit prompt from :func:`posttrain.data.extract_prompt`.

Tokens, as in TRL's ORPO trainer: the prompt starts with BOS when the tokenizer has one, each
completion ends with EOS (added unless already there). Prompt and completions are tokenized separately,
so no token spans their boundary. Truncation, in this order:

1. ``max_prompt_length``: the prompt keeps its *last* N tokens (the ones next to the completion).
2. ``max_length``: each completion is cut at its end so that prompt + completion fits. A row whose
   prompt alone fills ``max_length`` has nothing left to score; it is dropped with one warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from posttrain import DataError, RowProblem
from posttrain.data import apply_chat_template, extract_prompt, is_conversational, validate

FORMATS = ("preference",)
_FIELDS = ("prompt", "chosen", "rejected")


def row_problem(row: dict, index: int) -> RowProblem | None:
    """What core's preference check cannot see in one row: strings and messages mixed, or a conversational prompt
    that is empty (once the implicit prompt is taken) or does not end where a completion can follow."""
    conversational = isinstance(row.get("chosen"), list)
    for field in _FIELDS:
        value = row.get(field)
        if value is not None and isinstance(value, list) != conversational:
            kinds = ("a string", "message lists") if conversational else ("a message list", "strings")
            return RowProblem(
                index,
                field,
                f"is {kinds[0]} while other fields are {kinds[1]}",
                "A row is either all strings (standard) or all message lists (conversational).",
            )
    if not conversational:
        return None
    prompt = extract_prompt(row)["prompt"]
    if not prompt:
        return RowProblem(
            index,
            "prompt",
            "is empty after taking the common start of chosen and rejected",
            "Add an explicit 'prompt' column or start both conversations with the same messages.",
        )
    last_role = prompt[-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        return RowProblem(
            index,
            "prompt",
            f"ends with a {last_role!r} message",
            "It must end with a user or tool message (the completion answers it) or an assistant message (the "
            "completion continues it).",
        )
    return None


def row_problems(dataset: Any) -> list[RowProblem]:
    """Every bad row: core's preference checks, then :func:`row_problem` on the rows core accepts.

    ``check_rows`` reports these for ``posttrain check-data``, and :func:`prepare_rows` refuses exactly these rows.
    """
    problems = validate(dataset, FORMATS)
    reported = {p.row for p in problems}
    problems += [p for i, row in enumerate(dataset) if i not in reported and (p := row_problem(row, i))]
    return sorted(problems, key=lambda p: p.row)


def render_row(row: dict, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text of a valid row; conversational rows go through the chat template.

    The prompt text is the common prefix of the rendered prompt and both rendered conversations, so a
    template that renders the generation prompt differently from a finished turn cannot shift tokens.
    """
    row = extract_prompt(row)
    if not is_conversational(row):
        return row["prompt"], row["chosen"], row["rejected"]
    prompt = row["prompt"]
    continue_final = prompt[-1]["role"] == "assistant"
    prompt_text = apply_chat_template(
        tokenizer, prompt, add_generation_prompt=not continue_final, continue_final_message=continue_final
    )
    chosen_text = apply_chat_template(tokenizer, prompt + row["chosen"])
    rejected_text = apply_chat_template(tokenizer, prompt + row["rejected"])
    n = 0
    limit = min(len(prompt_text), len(chosen_text), len(rejected_text))
    while n < limit and prompt_text[n] == chosen_text[n] == rejected_text[n]:
        n += 1
    return prompt_text[:n], chosen_text[n:], rejected_text[n:]


def tokenize_row(prompt: str, chosen: str, rejected: str, tokenizer: Any) -> dict[str, list[int]]:
    """Token ids of the three texts: BOS before the prompt, EOS after each completion (when missing)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos, *prompt_ids]
    out = {"prompt_ids": prompt_ids}
    for field, text in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out[field] = ids if ids and ids[-1] == eos else [*ids, eos]
    return out


def truncate_row(ids: dict[str, list[int]], max_length: int, max_prompt_length: int | None) -> dict | None:
    """Apply ``max_prompt_length`` (keep the prompt's end), then ``max_length`` (cut completions' ends).

    Returns None when the prompt alone fills ``max_length``.
    """
    prompt_ids = ids["prompt_ids"]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": ids["chosen_ids"][:room],
        "rejected_ids": ids["rejected_ids"][:room],
    }


def prepare_rows(dataset: Any, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> list[dict]:
    """Validate every row, render, tokenize and truncate.

    Raises:
        DataError: carrying a :class:`~posttrain.RowProblem` for every bad row: those of :func:`row_problems`, and
            rows whose prompt gives no token with a tokenizer that has no BOS token (the first completion token
            would have no context).
    """
    problems = row_problems(dataset)
    if problems:
        raise DataError(problems, method="orpo")
    rows, dropped = [], []
    for index, row in enumerate(dataset):
        ids = tokenize_row(*render_row(row, tokenizer), tokenizer)
        if not ids["prompt_ids"]:
            problems.append(
                RowProblem(
                    index,
                    "prompt",
                    "gives no tokens and the tokenizer has no BOS token, so the first completion token could not be "
                    "scored",
                    "Give the row a non-empty prompt.",
                )
            )
            continue
        kept = truncate_row(ids, max_length, max_prompt_length)
        if kept is None:
            dropped.append(index)
        else:
            rows.append(kept)
    if problems:
        raise DataError(problems, method="orpo")
    if dropped:
        warnings.warn(
            f"dropped {len(dropped)} row(s) whose prompt alone fills max_length={max_length} (first: row "
            f"{dropped[0]}); raise max_length or set max_prompt_length to keep them.",
            stacklevel=2,
        )
    return rows


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``[chosen_1..chosen_B ; rejected_1..rejected_B]`` sequences, each prompt + completion.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on completion tokens), each (2B, T).
    """
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            sequences.append(row["prompt_ids"] + row[side])
            masks.append([0] * len(row["prompt_ids"]) + [1] * len(row[side]))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    for i, (sequence, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
        completion_mask[i, : len(sequence)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
