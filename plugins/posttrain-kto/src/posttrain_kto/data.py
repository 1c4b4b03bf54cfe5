"""KTO data: unpair preference rows, tokenize prompt/completion, and collate with mismatched KL pairs."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from posttrain import DataError, RowProblem
from posttrain.data import apply_chat_template, extract_prompt, is_conversational, validate

from posttrain_kto.config import KTOConfig

#: The formats KTO reads, in the order core's validation tries them (unpaired rows first).
FORMATS = ("unpaired_preference", "preference")


class KTOBalanceWarning(UserWarning):
    """The desirable:undesirable balance of the data and weights is outside the paper's recommended range."""


KTOBalanceWarning.__module__ = "posttrain_kto"

#: Eq. 8 of the paper: lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3].
RATIO_RANGE = (1.0, 4.0 / 3.0)


def unpair_preference(rows: list[dict]) -> list[dict]:
    """Turn preference rows into unpaired rows: each pair gives a desirable and an undesirable row.

    The chosen rows come first, then the rejected rows in the same order (TRL's ``unpair_preference_dataset``
    order), so a row's neighbours usually answer other prompts. Implicit prompts are extracted first; columns
    other than prompt/chosen/rejected are copied to both rows.
    """
    rows = [extract_prompt(row) for row in rows]
    out = []
    for key, label in (("chosen", True), ("rejected", False)):
        for row in rows:
            extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
            out.append({**extra, "prompt": row["prompt"], "completion": row[key], "label": label})
    return out


def tokenize_row(row: dict, tokenizer: Any) -> dict:
    """``prompt_ids`` and ``completion_ids`` of one unpaired row, split where the two tokenizations diverge.

    Standard rows get EOS appended to the completion when it is missing; conversational rows are rendered with
    the chat template (the prompt with the generation prompt), as TRL does.
    """
    if is_conversational(row):
        prompt_text = apply_chat_template(tokenizer, row["prompt"], add_generation_prompt=True)
        full_text = apply_chat_template(tokenizer, row["prompt"] + row["completion"])
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    else:
        completion = row["completion"]
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        prompt_ids = tokenizer(row["prompt"]).input_ids
        full_ids = tokenizer(row["prompt"] + completion).input_ids
    # a merge across the boundary can change the last prompt token: the completion starts where they differ
    split = 0
    while split < min(len(prompt_ids), len(full_ids)) and prompt_ids[split] == full_ids[split]:
        split += 1
    return {"prompt_ids": full_ids[:split], "completion_ids": full_ids[split:], "label": bool(row["label"])}


def balance_warning(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """The advice to give when lambda_D*n_D / (lambda_U*n_U) is outside [1, 4/3] (paper Eq. 8), else None."""
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable (label true)" if n_desirable == 0 else "undesirable (label false)"
        return (
            f"the KTO training data has no {missing} rows ({n_desirable} desirable, {n_undesirable} undesirable); "
            "KTO learns from both kinds, so add rows of the missing kind."
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = RATIO_RANGE
    if low <= ratio <= high + 1e-12:
        return None
    d_low = undesirable_weight * n_undesirable / n_desirable  # desirable_weight that makes the ratio exactly 1
    u_high = desirable_weight * n_desirable / n_undesirable  # undesirable_weight that makes the ratio exactly 1
    return (
        f"KTO data balance: {n_desirable} desirable x desirable_weight {desirable_weight:g} vs {n_undesirable} "
        f"undesirable x undesirable_weight {undesirable_weight:g} gives a ratio of {ratio:.4g}, outside the range "
        f"[1, 4/3] the KTO paper recommends (Eq. 8). Set desirable_weight in [{d_low:.4g}, {d_low * high:.4g}] "
        f"(e.g. --desirable_weight {d_low:.4g}) or undesirable_weight in [{u_high / high:.4g}, {u_high:.4g}] "
        f"(e.g. --undesirable_weight {u_high:.4g}), not both."
    )


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


def row_problems(dataset: Any) -> list[RowProblem]:
    """Every bad row: core's checks of the unpaired (or paired) preference format, then strings and messages mixed
    within a row. ``KTO.check_rows`` reports these and :func:`prepare_rows` refuses exactly these rows."""
    problems = validate(dataset, FORMATS)
    reported = {p.row for p in problems}
    problems += [p for p in same_kind_problems(dataset) if p.row not in reported]
    return sorted(problems, key=lambda p: p.row)


def prepare_rows(dataset: Any, tokenizer: Any, config: KTOConfig, warn_balance: bool = True) -> list[dict]:
    """Validate, unpair if needed, tokenize, drop rows whose prompt fills ``max_length``, warn about the class balance.

    Raises:
        DataError: carrying the :class:`~posttrain.RowProblem` of every bad row (:func:`row_problems`).
    """
    problems = row_problems(dataset)
    if problems:
        raise DataError(problems, method="kto")
    rows = [dict(row) for row in dataset]
    if rows and "label" not in rows[0]:
        rows = unpair_preference(rows)
    prepared = [tokenize_row(row, tokenizer) for row in rows]
    max_length = config.max_length
    if max_length is not None:
        kept = [row for row in prepared if len(row["prompt_ids"]) < max_length]
        if len(kept) < len(prepared):
            warnings.warn(
                f"KTO: dropped {len(prepared) - len(kept)} of {len(prepared)} rows whose prompt alone has "
                f">= max_length={max_length} tokens (no completion token would be left); raise max_length "
                "to keep them.",
                UserWarning,
                stacklevel=3,
            )
        prepared = kept
    for i, row in enumerate(prepared):
        row["index"] = i  # the order that fixes mismatched pairs (see collate_rows)
    if warn_balance:
        n_desirable = sum(row["label"] for row in prepared)
        advice = balance_warning(
            n_desirable, len(prepared) - n_desirable, config.desirable_weight, config.undesirable_weight
        )
        if advice:
            warnings.warn(advice, KTOBalanceWarning, stacklevel=3)
    return prepared


def fix_kl_partners(rows: list[dict]) -> None:
    """Give each row a fixed mismatched completion: that of the previous row (for precomputed reference KL)."""
    for i, row in enumerate(rows):
        row["kl_completion_ids"] = rows[i - 1]["completion_ids"]


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _sequences(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int | None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    ids, masks = [], []
    for p, c in zip(prompts, completions):
        ids.append((p + c)[:max_length])  # keep the start: the prompt, then as much completion as fits
        masks.append(([0] * len(p) + [1] * len(c))[:max_length])
    return {
        f"{prefix}input_ids": _pad(ids, pad_id),  # (B, T)
        f"{prefix}attention_mask": _pad([[1] * len(s) for s in ids], 0),  # (B, T)
        f"{prefix}completion_mask": _pad(masks, 0),  # (B, T)
    }


def collate_rows(rows: list[dict], pad_id: int, max_length: int | None, with_kl: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a micro-batch, plus the mismatched KL sequences when ``with_kl``.

    Rows are ordered by their prepared index first, so the batch (and its KL pairs) depend only on which rows
    are in it, not on the sampler's order. Each row's KL sequence is its prompt followed by the completion of the
    previous row (the last row's for the first): ``[c_B, c_1, ..., c_{B-1}]``, TRL's rotation. Rows with a fixed
    ``kl_completion_ids`` (precomputed reference) keep it.
    """
    rows = sorted(rows, key=lambda r: r["index"])
    prompts = [r["prompt_ids"] for r in rows]
    batch = _sequences(prompts, [r["completion_ids"] for r in rows], pad_id, max_length)
    batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)  # (B,)
    if with_kl:
        if "kl_completion_ids" in rows[0]:
            kl_completions = [r["kl_completion_ids"] for r in rows]
        else:
            kl_completions = [rows[i - 1]["completion_ids"] for i in range(len(rows))]
        batch.update(_sequences(prompts, kl_completions, pad_id, max_length, prefix="kl_"))
    for key in ("ref_logps", "ref_kl_logps"):
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)  # (B,)
    return batch
