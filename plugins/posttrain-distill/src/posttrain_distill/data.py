"""Distillation data: tokenize prompts (and dataset completions), collate left-padded prompts."""

from __future__ import annotations

from typing import Any

import torch
from posttrain.data import apply_chat_template, is_conversational


def same_kind_problems(rows: list[dict]) -> list[str]:
    """Rows whose prompt and completion mix strings and message lists (the chat template needs one kind per row)."""
    problems = []
    for i, row in enumerate(rows):
        completion = row.get("completion")
        if completion is not None and isinstance(completion, list) != isinstance(row.get("prompt"), list):
            kinds = ["messages" if isinstance(v, list) else "a string" for v in (row.get("prompt"), completion)]
            problems.append(
                f"row {i} of the dataset: field 'completion' is {kinds[1]} but 'prompt' is {kinds[0]}; "
                "use strings for both (standard) or message lists for both (conversational)."
            )
    return problems


def tokenize_row(row: dict, tokenizer: Any, max_completion_length: int) -> dict:
    """``prompt_ids`` of a row, and ``completion_ids`` when the row has a completion (cut to the maximum).

    Conversational prompts get the chat template with the generation prompt, as in generation. A standard
    completion gets EOS appended when it is missing, so off-policy completions end like generated ones.
    """
    conversational = is_conversational(row)
    if conversational:
        text = apply_chat_template(tokenizer, row["prompt"], add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(row["prompt"]).input_ids
    out = {"prompt_ids": prompt_ids}
    if row.get("completion") is not None:
        if conversational:
            full_text = apply_chat_template(tokenizer, row["prompt"] + row["completion"])
            full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
        else:
            completion = row["completion"]
            if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
                completion += tokenizer.eos_token
            full_ids = tokenizer(row["prompt"] + completion).input_ids
        # the completion starts where the two tokenizations diverge (a merge can change the last prompt token)
        split = 0
        while split < min(len(prompt_ids), len(full_ids)) and prompt_ids[split] == full_ids[split]:
            split += 1
        out = {"prompt_ids": full_ids[:split], "completion_ids": full_ids[split:][:max_completion_length]}
    return out


def collate_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (ready for ``generate``), each row's dataset index, and right-padded completions when
    every row has one."""
    width = max(len(r["prompt_ids"]) for r in rows)
    prompt_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P)
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        if n:
            prompt_ids[i, width - n :] = torch.tensor(r["prompt_ids"], dtype=torch.long)
            prompt_mask[i, width - n :] = 1
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
    batch["row_index"] = torch.tensor([r.get("index", i) for i, r in enumerate(rows)], dtype=torch.long)  # (B,)
    if all("completion_ids" in r for r in rows):
        width = max(1, max(len(r["completion_ids"]) for r in rows))
        completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, C)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, C)
        for i, r in enumerate(rows):
            n = len(r["completion_ids"])
            completion_ids[i, :n] = torch.tensor(r["completion_ids"], dtype=torch.long)
            completion_mask[i, :n] = 1
        batch.update(completion_ids=completion_ids, completion_mask=completion_mask)
    return batch
