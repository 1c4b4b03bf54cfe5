"""BCO data: unpaired rows (prompt, completion, label); paired rows are split into two unpaired ones.

Each prepared row holds ``prompt_ids``, ``completion_ids`` and ``label``. A micro-batch is one tensor of
prompt+completion sequences, right-padded, with a ``completion_mask`` marking the scored tokens.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from posttrain import DataError, RowProblem
from posttrain.data import apply_chat_template, extract_prompt, is_conversational, validate

#: The formats BCO reads, in the order core's validation tries them (unpaired rows first).
FORMATS = ("unpaired_preference", "preference")


# Copied from posttrain_kto.data.same_kind_problems
def same_kind_problems(rows: Any) -> list[RowProblem]:
    """Rows whose prompt and answers mix strings and message lists (the chat template needs one kind per row).

    Each answer is compared with the prompt, or with ``chosen`` when the prompt is implicit.
    """
    problems = []
    for i, row in enumerate(rows):
        first = "prompt" if row.get("prompt") is not None else "chosen"
        if row.get(first) is None:
            continue
        for key in ("completion", "chosen", "rejected"):
            if key != first and row.get(key) is not None and isinstance(row[key], list) != isinstance(row[first], list):
                kinds = ["messages" if isinstance(row[k], list) else "a string" for k in (first, key)]
                problems.append(
                    RowProblem(
                        i,
                        key,
                        f"is {kinds[1]} but {first!r} is {kinds[0]}",
                        "Use strings for both (standard) or message lists for both (conversational).",
                    )
                )
    return problems


def row_problems(dataset: Any, source: str = "the dataset") -> list[RowProblem]:
    """Every bad row: core's checks of the unpaired (or paired) preference format, then strings and messages mixed
    within a row. ``BCO.check_rows`` reports these and :func:`prepare_rows` refuses exactly these rows."""
    problems = validate(dataset, FORMATS, source)
    reported = {p.row for p in problems}
    problems += [p for p in same_kind_problems(dataset) if p.row not in reported]
    return sorted(problems, key=lambda p: p.row)


def unpair(dataset: Any) -> list[dict]:
    """Rows as (prompt, completion, label); a preference row gives (chosen, true) then (rejected, false)."""
    rows = []
    for row in dataset:
        if row.get("completion") is not None:
            rows.append({"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]})
            continue
        row = extract_prompt(row)  # implicit prompt: the common start of chosen and rejected
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return rows


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_row(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion that follows it.

    Prompt and prompt+completion are tokenized separately (conversational rows through the chat template) and split
    where they diverge, so a token merging across the boundary is counted once, in the completion. Standard rows get
    the tokenizer's BOS in front when it has one and EOS at the end when the completion lacks it.
    """
    if is_conversational({"prompt": prompt, "completion": completion}):
        prompt_text = apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
        full_text = apply_chat_template(tokenizer, prompt + completion)
    else:
        prompt_text, full_text = prompt, prompt + completion
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    split = common_prefix_length(prompt_ids, full_ids)
    prompt_ids, completion_ids = full_ids[:split], full_ids[split:]
    bos = tokenizer.bos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos, *prompt_ids]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def prepare_rows(dataset: Any, tokenizer: Any, max_length: int, source: str = "the dataset") -> list[dict]:
    """Validate, unpair, tokenize and truncate.

    Sequences longer than ``max_length`` lose the end of their completion. A row whose prompt leaves no room for a
    single completion token is dropped, with one warning counting them.

    Raises:
        DataError: carrying the :class:`~posttrain.RowProblem` of every bad row (:func:`row_problems`).
    """
    problems = row_problems(dataset, source)
    if problems:
        raise DataError(problems, method="bco")
    out, dropped = [], 0
    for row in unpair(dataset):
        prompt_ids, completion_ids = tokenize_row(tokenizer, row["prompt"], row["completion"])
        room = max_length - len(prompt_ids)
        if room < 1:
            dropped += 1
            continue
        out.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids[:room], "label": bool(row["label"])})
    if dropped:
        warnings.warn(
            f"posttrain-bco: dropped {dropped} of {dropped + len(out)} rows whose prompt alone fills max_length="
            f"{max_length} tokens, leaving no completion to score. Raise max_length or shorten those prompts.",
            stacklevel=2,
        )
    return out


def collate_rows(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion tensors.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``completion_mask`` (B, T) (1 on completion tokens),
        ``labels`` (B,) bool.
    """
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, len(row["prompt_ids"]) : len(seq)] = 1
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "labels": labels,
    }
