"""Prompt-only data: validate, render the chat template, tokenize once; collate left-padded prompts.

Every column other than ``prompt`` travels with the row and reaches the reward functions, repeated for
each completion of the prompt (``answer``, ``solution``, ...).
"""

from __future__ import annotations

import torch
from posttrain import DataError
from posttrain.data import apply_chat_template, check, is_conversational

FORMATS = ("prompt_only",)


def prepare(dataset, tokenizer, source: str = "the dataset") -> list[dict]:
    """Rows of ``{"prompt_ids", "prompt", "columns", "index"}``; raises DataError naming a bad row.

    Conversational prompts are rendered with ``add_generation_prompt=True`` and tokenized without extra
    special tokens (the template has them); standard prompts are tokenized as-is, as TRL does.
    """
    check(dataset, FORMATS, source)
    rows = []
    for index, row in enumerate(dataset):
        prompt = row["prompt"]
        if is_conversational({"prompt": prompt}):
            text = apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(prompt).input_ids
        if not ids:
            raise DataError(
                f"row {index} of {source}: field 'prompt' tokenizes to no tokens ({prompt!r}). "
                "Fill in the prompt or remove the row."
            )
        columns = {k: v for k, v in row.items() if k != "prompt"}
        rows.append({"prompt_ids": ids, "prompt": prompt, "columns": columns, "index": index})
    return rows


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """A micro-batch of prompts.

    Returns:
        ``prompt_ids`` (B, P) left-padded with ``pad_token_id``, ``prompt_mask`` (B, P), and the lists
        ``prompts`` (raw prompts), ``columns`` (name -> list of B values), ``row_index`` (dataset rows).
    """
    width = max(len(r["prompt_ids"]) for r in rows)
    prompt_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        prompt_ids[i, width - n :] = torch.tensor(r["prompt_ids"])
        prompt_mask[i, width - n :] = 1
    names = list(rows[0]["columns"])
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "prompts": [r["prompt"] for r in rows],
        "columns": {name: [r["columns"].get(name) for r in rows] for name in names},
        "row_index": [r["index"] for r in rows],
    }
