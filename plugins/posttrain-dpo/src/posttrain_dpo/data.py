"""Preference rows for DPO: validate, split implicit prompts, tokenize once, and collate pairs.

Tokenization follows TRL 1.16's DPOTrainer, so the same row gives the same token ids:

- standard rows get the EOS token appended to ``chosen`` and ``rejected`` when it is missing;
  ``prompt`` and ``prompt + chosen`` are tokenized with the tokenizer's special tokens;
- conversational rows render ``prompt`` with the generation prompt and ``prompt + chosen`` without,
  through the chat template (``tools`` and ``chat_template_kwargs`` columns are passed on);
- the completion starts where the tokenized prompt and prompt+completion first differ.

Truncation: ``max_prompt_length`` keeps the *last* prompt tokens (the start of the prompt is cut, so
the text next to the answer stays); ``max_length`` then keeps the *first* tokens of prompt+completion
(the end of the completion is cut, TRL 1.16's ``keep_start``). Rows whose prompt alone fills
``max_length`` are dropped with a warning: no completion token would be left to learn from.

Rows with images (``images``/``image``, for a vision-language model) are tokenized by the processor
(:func:`posttrain.vision.encode`), so the prompt holds each image's tokens; the images belong to the prompt, chosen
and rejected are text. The prepared row keeps ``images`` and the prompt's token-aligned inputs (``token_inputs``);
:func:`collate_pairs` adds the pixel values of each pair twice (the chosen and the rejected sequence).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain.data import apply_chat_template, extract_prompt, is_conversational, validate
from posttrain.ops import pack_sequences
from posttrain.vision import encode, has_images, image_inputs, image_problems, image_token_id, row_images

FIELDS = ("prompt", "chosen", "rejected")


def preference_problems(dataset: Any, source: str = "the dataset") -> list[RowProblem]:
    """Every bad row: core's preference-format checks, then standard/conversational mixing within a row.

    Rows core already reports are not checked for mixing, so a row is not reported twice for one cause.
    """
    problems = validate(dataset, ("preference",), source)
    reported = {p.row for p in problems}
    for i, row in enumerate(dataset):
        if i in reported:
            continue
        conversational = isinstance(row.get("chosen"), list)
        for name in FIELDS:
            value = row.get(name)
            if value is not None and isinstance(value, list) != conversational:
                kind = "a list of messages" if isinstance(value, list) else "a string"
                chosen_kind = "a list of messages" if conversational else "a string"
                problems.append(
                    RowProblem(
                        i,
                        name,
                        f"is {kind} while 'chosen' is {chosen_kind}",
                        "Use strings for prompt, chosen and rejected (standard) or message lists for all three "
                        "(conversational).",
                    )
                )
                break
    return sorted(problems, key=lambda p: p.row)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_row(row: dict, tokenizer: Any, max_prompt_length: int | None = None, processor: Any = None) -> dict:
    """Token ids of one preference row: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints); with a
    ``processor``, a row with images is tokenized by it and also keeps ``images`` and ``token_inputs``."""
    row = extract_prompt(row)  # implicit prompt: the common prefix of chosen and rejected
    images = row_images(row) if processor is not None else []
    tools = row.get("tools")
    kwargs = {
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        **(row.get("chat_template_kwargs") or {}),
    }
    token_inputs: dict[str, list[int]] = {}
    if images:
        if is_conversational(row):
            pieces = [row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
            first = encode(processor, pieces[0], images, add_generation_prompt=True, **kwargs)
            rest = [encode(processor, piece, images, **kwargs) for piece in pieces[1:]]
        else:
            eos = tokenizer.eos_token
            chosen, rejected = (t if t.endswith(eos) else t + eos for t in (row["chosen"], row["rejected"]))
            first = encode(processor, row["prompt"], images)
            rest = [encode(processor, row["prompt"] + t, images) for t in (chosen, rejected)]
        prompt_ids, chosen_full, rejected_full = first["input_ids"], rest[0]["input_ids"], rest[1]["input_ids"]
        token_inputs = first["token_inputs"]
    elif is_conversational(row):
        texts = [
            apply_chat_template(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs),
            apply_chat_template(tokenizer, row["prompt"] + row["chosen"], **kwargs),
            apply_chat_template(tokenizer, row["prompt"] + row["rejected"], **kwargs),
        ]
        # the rendered template already holds its special tokens, as transformers' tokenize=True path assumes
        prompt_ids, chosen_full, rejected_full = (tokenizer(t, add_special_tokens=False).input_ids for t in texts)
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (t if t.endswith(eos) else t + eos for t in (row["chosen"], row["rejected"]))
        texts = [row["prompt"], row["prompt"] + chosen, row["prompt"] + rejected]
        prompt_ids, chosen_full, rejected_full = (tokenizer(t).input_ids for t in texts)
    # a template may render the prompt alone differently, or tokens may merge across the boundary
    n = min(_common_prefix_length(prompt_ids, chosen_full), _common_prefix_length(prompt_ids, rejected_full))
    prompt_ids = prompt_ids[:n]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    out = {"prompt_ids": prompt_ids, "chosen_ids": chosen_full[n:], "rejected_ids": rejected_full[n:]}
    if images:
        keep = len(prompt_ids)  # the prompt's token-aligned inputs, cut as the prompt was
        out.update(images=images, token_inputs={k: v[:n][n - keep :] for k, v in token_inputs.items()})
    return out


def tokenize_dataset(
    dataset: Any, tokenizer: Any, max_length: int | None, max_prompt_length: int | None, processor: Any = None
) -> list[dict]:
    """Validate every row, tokenize, and drop rows with no room left; rows with images go through ``processor``.

    Raises:
        DataError: carrying every bad row's :class:`~posttrain.RowProblem` (those ``DPO.check_rows`` reports, and
            for image rows: image tokens missing from the prompt or cut by ``max_prompt_length``).
        ConfigError: rows with images and no processor.
    """
    problems = preference_problems(dataset)
    with_images = has_images(dataset)
    if with_images and processor is None:
        raise ConfigError(
            "posttrain-dpo: the dataset has rows with images but no processor was given, so the images would be "
            "ignored. Pass the vision-language model's processor (the loop passes ctx.processor)."
        )
    if with_images:
        reported, token = {p.row for p in problems}, getattr(processor, "image_token", None)
        problems += [
            q
            for i, row in enumerate(dataset)
            if i not in reported and not is_conversational(row)
            for q in image_problems(row, i, token, open_files=False)
        ]
    if problems:
        raise DataError(sorted(problems, key=lambda p: p.row), method="dpo")
    rows, dropped = [], []
    image_id = image_token_id(processor) if with_images else None
    for i, row in enumerate(dataset):
        ids = tokenize_row(row, tokenizer, None if with_images else max_prompt_length, processor)
        if "images" in ids and max_prompt_length is not None and len(ids["prompt_ids"]) > max_prompt_length:
            cut = len(ids["prompt_ids"]) - max_prompt_length  # the start of the prompt goes
            if image_id in ids["prompt_ids"][:cut]:
                problems.append(
                    RowProblem(
                        i,
                        "prompt",
                        f"loses image tokens to max_prompt_length={max_prompt_length}: the start of the prompt is "
                        "cut, and an image sits there",
                        "Raise max_prompt_length or set it to null; images must reach the model whole.",
                    )
                )
                continue
            ids["prompt_ids"] = ids["prompt_ids"][cut:]
            ids["token_inputs"] = {k: v[cut:] for k, v in ids["token_inputs"].items()}
        if max_length is not None and len(ids["prompt_ids"]) >= max_length:
            dropped.append(i)
            continue
        rows.append(ids)
    if problems:
        raise DataError(problems, method="dpo")
    if dropped:
        warnings.warn(
            f"posttrain-dpo: dropped {len(dropped)} of {len(dropped) + len(rows)} rows (first: row {dropped[0]}) whose "
            f"prompt alone fills max_length={max_length} tokens, so no completion token would be trained on. "
            "Raise max_length or set max_prompt_length to keep them.",
            stacklevel=2,
        )
    return rows


def pair_lengths(rows: list[dict], max_length: int | None = None) -> list[int]:
    """The lengths of the 2B sequences :func:`collate_pairs` builds (prompt + chosen, then prompt + rejected)."""
    lengths = [len(r["prompt_ids"]) + len(r[side]) for side in ("chosen_ids", "rejected_ids") for r in rows]
    return lengths if max_length is None else [min(n, max_length) for n in lengths]


def collate_pairs(
    rows: list[dict],
    pad_token_id: int,
    max_length: int | None = None,
    processor: Any = None,
    padding_free: bool = False,
) -> dict:
    """Pad B pairs into one 2B batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.

    Each sequence is cut to ``max_length`` (end removed) before right padding.

    Returns:
        ``input_ids``, ``attention_mask``, ``completion_mask``: (2B, T) long tensors; plus
        ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,) float32 when the rows carry them. Rows with images add
        the ``processor``'s image tensors for the 2B sequences and the prompt's token-aligned inputs (0 over the
        completion and padding), named in ``vision_inputs``. ``padding_free`` (text rows only) gives one (1, N) row
        of the 2B sequences in the same order instead (:func:`posttrain.ops.pack_sequences`: ``input_ids``,
        ``position_ids``, ``sequence_ids``, ``completion_mask``, and ``sequence_lengths`` (2B,)), no padding.
    """
    sequences = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    masks = [[0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"]) for r in rows]
    masks += [[0] * len(r["prompt_ids"]) + [1] * len(r["rejected_ids"]) for r in rows]
    if max_length is not None:
        sequences, masks = [s[:max_length] for s in sequences], [m[:max_length] for m in masks]
    if padding_free:
        batch = pack_sequences(sequences, completion_mask=masks)
        if "ref_chosen_logps" in rows[0]:
            batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
        return batch
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    for i, (ids, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if processor is not None and any(r.get("images") for r in rows):
        pairs = rows + rows  # the chosen sequences, then the rejected ones: each sees its prompt's images
        extra = image_inputs(processor, [r.get("images", []) for r in pairs])
        for name in dict.fromkeys(k for r in rows for k in r.get("token_inputs", {})):
            values = torch.zeros((len(pairs), width), dtype=torch.long)  # (2B, T), 0 over completions and padding
            for i, r in enumerate(pairs):
                prompt_values = r.get("token_inputs", {}).get(name, [])[:width]
                values[i, : len(prompt_values)] = torch.tensor(prompt_values, dtype=torch.long)
            extra[name] = values
        batch.update(extra)
        batch["vision_inputs"] = sorted(extra)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32)  # (B,)
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    return batch
