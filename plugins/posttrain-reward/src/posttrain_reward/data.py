"""Preference rows -> token ids of (prompt + chosen, prompt + rejected), and the pair collator.

Scoring convention (a reward-model consumer must encode text the same way, see :func:`encode`):

- standard rows: ``tokenizer(prompt + response + eos).input_ids`` (EOS appended unless the text already ends with
  it; the tokenizer's own special tokens, e.g. BOS, included);
- conversational rows: ``tokenizer.apply_chat_template(prompt_messages + response_messages, tokenize=True)``,
  no generation prompt;
- the reward is the head's output at the last token that is not ``pad_token_id``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from posttrain import DataError, RowProblem
from posttrain.data import extract_prompt, validate


def encode(tokenizer: Any, prompt: str | list[dict] | None, response: str | list[dict]) -> list[int]:
    """Token ids of ``prompt + response`` exactly as the reward model was trained to score them.

    Args:
        tokenizer: the run's tokenizer (saved next to the model).
        prompt: a string, a list of messages, or None/"" for none.
        response: a string (standard) or a list of messages (conversational), the same kind as ``prompt``.
    """
    if isinstance(response, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                "the dataset is conversational but the tokenizer has no chat template; set tokenizer.chat_template "
                "(for example in tokenizer_config.json) or use standard (string) rows."
            )
        messages = list(prompt or []) + list(response)
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = (prompt or "") + response
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):  # the last token (EOS) is the one scored, as in TRL
        text += eos
    return list(tokenizer(text).input_ids)


def _row_problem(row: dict, index: int, has_margin: bool) -> RowProblem | None:
    """What core's preference check cannot see: mixed standard/conversational fields and a bad margin."""
    conversational = isinstance(row.get("chosen"), list)
    for field in ("rejected", "prompt"):
        value = row.get(field)
        if value not in (None, "", []) and isinstance(value, list) != conversational:
            kinds = ("a list of messages", "a string") if conversational else ("a string", "a list of messages")
            return RowProblem(
                index,
                field,
                f"is {kinds[1]} but 'chosen' is {kinds[0]}",
                "A row is either standard (all strings) or conversational (all message lists); convert the row.",
            )
    margin = row.get("margin")
    if has_margin and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)):
        return RowProblem(
            index,
            "margin",
            f"must be a finite number, got {margin!r}",
            "The margin column is optional, but once present every row needs one (use 0 for no margin).",
        )
    return None


def pair_problems(dataset: Any, source: str = "the dataset") -> list[RowProblem]:
    """Every bad row: core's preference checks, then mixed kinds within a row and a bad ``margin``.

    ``Reward.check_rows`` (``posttrain check-data reward FILE``) reports these, and :func:`prepare_pairs` refuses
    exactly these rows. A row core already reports is not checked again.
    """
    problems = validate(dataset, ("preference",), source)
    reported = {p.row for p in problems}
    has_margin = "margin" in _columns(dataset)
    problems += [p for i, row in enumerate(dataset) if i not in reported and (p := _row_problem(row, i, has_margin))]
    return sorted(problems, key=lambda p: p.row)


def check_pairs(dataset: Any, source: str = "the dataset") -> list[str]:
    """The messages of :func:`pair_problems`, one line per problem (kept for code written against 1.0)."""
    return [p.message(source) for p in pair_problems(dataset, source)]


def _columns(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list({key: None for row in dataset for key in row})  # every key of every row, in first-seen order


def prepare_pairs(
    dataset: Any,
    tokenizer: Any,
    max_length: int | None,
    truncation_mode: str = "filter",
    source: str = "the dataset",
) -> tuple[list[dict], int]:
    """Validate and tokenize preference rows.

    Args:
        dataset: a ``datasets.Dataset`` (or list of dicts) in the preference format, standard or conversational,
            with an explicit ``prompt`` or an implicit one (the common prefix of chosen and rejected); optional
            numeric ``margin`` column.
        tokenizer: tokenizer with ``eos_token`` (standard rows) or a chat template (conversational rows).
        max_length: longest sequence allowed per side, or None.
        truncation_mode: ``"filter"`` drops a pair whose chosen or rejected sequence is longer than ``max_length``
            (TRL 1.16); ``"keep_end"`` keeps the last ``max_length`` tokens of each side, cutting the prompt's start.
        source: how errors name the dataset.

    Returns:
        (rows, n_filtered): rows hold ``chosen_ids``, ``rejected_ids`` and, with a margin column, ``margin``.

    Raises:
        DataError: carrying the :class:`~posttrain.RowProblem` of every malformed row (:func:`pair_problems`).
    """
    problems = pair_problems(dataset, source)
    if problems:
        raise DataError(problems, method="reward")
    has_margin = "margin" in _columns(dataset)
    rows, n_filtered = [], 0
    for raw in dataset:
        row = extract_prompt(dict(raw))  # implicit prompt: the common prefix; prompt + chosen is unchanged
        chosen_ids = encode(tokenizer, row["prompt"], row["chosen"])
        rejected_ids = encode(tokenizer, row["prompt"], row["rejected"])
        if max_length is not None and max(len(chosen_ids), len(rejected_ids)) > max_length:
            if truncation_mode == "filter":
                n_filtered += 1
                continue
            chosen_ids, rejected_ids = chosen_ids[-max_length:], rejected_ids[-max_length:]
        out = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        if has_margin:
            out["margin"] = float(row["margin"])
        rows.append(out)
    return rows, n_filtered


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack ``[all chosen; all rejected]`` and right-pad (TRL's ``DataCollatorForPreference`` layout).

    Returns:
        ``input_ids`` (2B, T) padded with ``pad_token_id``, ``attention_mask`` (2B, T), and ``margin`` (B,) float32
        when the rows carry one. Row i and row B + i are the two sides of pair i.
    """
    sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "margin" in rows[0]:
        batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)  # (B,)
    return batch
