"""SFT data: validate rows, tokenize them, mark the tokens that carry loss, pack, and collate micro-batches.

Rows use TRL's dataset types, standard (strings) or conversational (message lists):

- language modeling: ``text`` (or the ``dataset_text_field`` column) / ``messages``;
- prompt-completion: ``prompt`` + ``completion``.

Optional ``tools`` (a list or JSON string) and ``chat_template_kwargs`` columns reach the chat template, as in TRL.
Each prepared row is ``{"input_ids", "labels"}`` (``labels`` = ``input_ids`` with -100 where no loss is taken),
plus ``seq_lengths`` for a packed row.

Rows with images (``images``/``image``, for a vision-language model) are tokenized by the processor, so each image's
tokens are expanded in ``input_ids`` (:func:`posttrain.vision.encode`); the prepared row keeps its ``images`` and
the processor's token-aligned inputs (``token_inputs``), and :func:`collate` adds the pixel values per micro-batch.
Masks are computed exactly as for text: image tokens sit in the prompt, so they never carry loss with
``completion_only_loss`` and lie outside the assistant's ``{% generation %}`` blocks.
"""

from __future__ import annotations

import bisect
import json
import re
import warnings
from collections import deque
from typing import Any

import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain.data import is_conversational, validate
from posttrain.vision import encode, has_images, image_inputs, image_problems, image_token_id, row_images

from posttrain_sft.config import SFTConfig
from posttrain_sft.loss import IGNORE_INDEX

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def row_problems(dataset: Any) -> list[RowProblem]:
    """Every bad row: core's format checks, then rows whose prompt and completion mix a string and a message list
    (the chat template needs one kind). ``SFT.check_rows`` reports these and :func:`prepare_rows` refuses them.

    The format is prompt-completion when the rows have both columns, else language modeling, as in ``prepare_rows``.
    """
    fmt = "prompt_completion" if {"prompt", "completion"} <= set(_columns(dataset)) else "language_modeling"
    problems = validate(dataset, fmt)
    reported = {p.row for p in problems}
    for i, row in enumerate(dataset):
        prompt, completion = row.get("prompt"), row.get("completion")
        if (
            i in reported
            or prompt is None
            or completion is None
            or isinstance(prompt, list) == isinstance(completion, list)
        ):
            continue
        kinds = ["a list of messages" if isinstance(v, list) else "a string" for v in (completion, prompt)]
        problems.append(
            RowProblem(
                i,
                "completion",
                f"is {kinds[0]} while 'prompt' is {kinds[1]}",
                "Use strings for both (standard) or message lists for both (conversational).",
            )
        )
    return sorted(problems, key=lambda p: p.row)


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two sequences share (where the completion starts, as TRL finds it)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _chat(tokenizer: Any, messages: list[dict], row: dict, **kwargs) -> dict:
    """``apply_chat_template`` as TRL calls it: tokenized, with the row's ``tools`` and ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = row.get("chat_template_kwargs") or {}
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=tools, **extra, **kwargs)


class _Tokens:
    """Tokenization of one row by the tokenizer, or by the processor when the row has images (each image's tokens
    expanded; the processor's token-aligned inputs of the last full sequence kept in ``token_inputs``)."""

    def __init__(self, tokenizer: Any, processor: Any, row: dict):
        self.tokenizer, self.processor, self.row = tokenizer, processor, row
        self.images = row_images(row) if processor is not None else []
        self.token_inputs: dict[str, list[int]] = {}

    def text(self, text: str) -> list[int]:
        if not self.images:
            return self.tokenizer(text).input_ids
        encoded = encode(self.processor, text, self.images)
        self.token_inputs = encoded["token_inputs"]
        return encoded["input_ids"]

    def chat(self, messages: list[dict], **kwargs) -> dict:
        if not self.images:
            return _chat(self.tokenizer, messages, self.row, **kwargs)
        tools = self.row.get("tools")
        assistant = kwargs.pop("return_assistant_tokens_mask", False)
        encoded = encode(
            self.processor,
            messages,
            self.images,
            assistant_mask=assistant,
            tools=json.loads(tools) if isinstance(tools, str) else tools,
            **(self.row.get("chat_template_kwargs") or {}),
            **kwargs,
        )
        self.token_inputs = encoded["token_inputs"]
        return encoded


def tokenize_row(
    row: dict,
    index: int,
    tokenizer: Any,
    completion_only: bool,
    assistant_only: bool,
    diverged: list | None = None,
    processor: Any = None,
) -> dict:
    """One raw row -> ``{"input_ids", "labels"}``, following TRL 1.16's ``SFTTrainer._prepare_dataset``.

    Standard text and completions get the EOS token appended when they do not end with it; conversations end
    however the chat template ends them. ``completion_only`` masks the prompt; ``assistant_only`` masks every token
    outside the template's ``{% generation %}`` blocks. Both masks apply when both are on. ``index`` is appended to
    ``diverged`` when the prompt tokenizes differently alone than followed by its completion. With a ``processor``,
    a row with images is tokenized by it and keeps ``images`` and ``token_inputs``.

    Raises:
        DataError: carrying one :class:`~posttrain.RowProblem`: ``assistant_only`` on a standard row, or a conversation
            with no assistant token.
    """
    conversational = is_conversational(row)
    if assistant_only and not conversational:
        field = "prompt" if row.get("completion") is not None else "text"
        raise DataError(
            RowProblem(
                index,
                field,
                "is standard text, but assistant_only_loss is true and assistant turns exist only in message lists",
                "Use `messages` (or conversational prompt/completion) rows, or set assistant_only_loss false.",
            ),
            method="sft",
        )
    masks: list[list[int]] = []
    tokens = _Tokens(tokenizer, processor, row)
    if row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if conversational:
            prompt_ids = tokens.chat(prompt, add_generation_prompt=True)["input_ids"]
            out = tokens.chat(prompt + completion, return_assistant_tokens_mask=assistant_only)
            input_ids = list(out["input_ids"])
        else:
            eos = tokenizer.eos_token
            completion = completion if completion.endswith(eos) else completion + eos
            prompt_ids = tokens.text(prompt)
            input_ids = tokens.text(prompt + completion)
            out = {}
        # The completion starts where the two tokenizations diverge: templates may render a lone prompt differently,
        # and BPE merges can cross the prompt/completion boundary.
        n_prompt = common_prefix_length(prompt_ids, input_ids)
        if n_prompt < len(prompt_ids) and diverged is not None:
            diverged.append(index)
        if completion_only:
            masks.append([0] * n_prompt + [1] * (len(input_ids) - n_prompt))
    elif conversational:
        out = tokens.chat(row["messages"], return_assistant_tokens_mask=assistant_only)
        input_ids = list(out["input_ids"])
    else:
        text, eos = row["text"], tokenizer.eos_token
        input_ids = tokens.text(text if text.endswith(eos) else text + eos)
        out = {}
    if assistant_only:
        assistant = list(out["assistant_masks"])
        if 1 not in assistant:
            raise DataError(
                RowProblem(
                    index,
                    "completion" if row.get("completion") is not None else "messages",
                    "has no token the chat template marks as the assistant's, so with assistant_only_loss the row "
                    "would carry no loss",
                    "Add an assistant message to the row, or check that the template wraps assistant content in "
                    "{% generation %}...{% endgeneration %}.",
                ),
                method="sft",
            )
        masks.append(assistant)
    labels = [tok if all(m[i] for m in masks) else IGNORE_INDEX for i, tok in enumerate(input_ids)]
    if tokens.images:
        return {"input_ids": input_ids, "labels": labels, "images": tokens.images, "token_inputs": tokens.token_inputs}
    return {"input_ids": input_ids, "labels": labels}


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: the indices of the sequences in each bin, bins in creation order.

    Sequences are placed longest first, each into the open bin with the least free space that still holds it
    (the earliest such bin on ties), else into a new bin: TRL's ``bfd`` strategy, over the whole dataset.

    Args:
        lengths: length of each sequence, each <= ``capacity``.
        capacity: tokens per bin (``max_length``).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep dataset order
    free: list[int] = []  # sorted distinct free-space values that some open bin has
    bins_with: dict[int, deque] = {}  # free space -> open bins with exactly that much, oldest first
    bins: list[list[int]] = []
    for i in order:
        k = bisect.bisect_left(free, lengths[i])
        if k < len(free):
            space = free[k]
            chosen = bins_with[space].popleft()
            if not bins_with[space]:
                del free[k], bins_with[space]
        else:
            space, chosen = capacity, []
            bins.append(chosen)
        chosen.append(i)
        left = space - lengths[i]
        if left > 0:
            if left not in bins_with:
                bisect.insort(free, left)
                bins_with[left] = deque()
            bins_with[left].append(chosen)
    return bins


def _columns(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list({key: None for row in dataset for key in row})  # every key of every row, in first-seen order


def prepare_rows(dataset: Any, tokenizer: Any, config: SFTConfig, processor: Any = None) -> list[dict]:
    """Validate, tokenize, label, truncate (or pack) every row of ``dataset``; rows with images go through
    ``processor`` (a vision-language model's).

    Raises:
        DataError: carrying the :class:`~posttrain.RowProblem` of every bad row (index, field, what, how to fix).
        ConfigError: an option the data or tokenizer cannot support.
    """
    if not hasattr(dataset, "column_names"):  # a list of rows, as `posttrain check-data` reads a JSONL file
        dataset = [dict(row) for row in dataset]
    columns = _columns(dataset)
    field = config.dataset_text_field
    if field != "text" and field in columns:
        if hasattr(dataset, "rename_column"):
            dataset = dataset.remove_columns([c for c in ("text",) if c in columns]).rename_column(field, "text")
        else:
            dataset = [
                {**{k: v for k, v in row.items() if k not in ("text", field)}, "text": row.get(field)}
                for row in dataset
            ]
        columns = _columns(dataset)
    elif field != "text" and not ({"messages", "completion"} & set(columns)):
        raise DataError(
            f"dataset_text_field is {field!r} but the dataset has no such column (columns: {columns}). "
            "Set dataset_text_field to the column that holds the text."
        )
    fmt = "prompt_completion" if {"prompt", "completion"} <= set(columns) else "language_modeling"
    problems = row_problems(dataset)
    with_images = has_images(dataset)
    if with_images and processor is None:
        raise ConfigError(
            "the dataset has rows with images but no processor was given, so the images would be ignored. Pass the "
            "vision-language model's processor (prepare_rows(..., processor=...); the loop passes ctx.processor)."
        )
    if with_images:
        _check_image_options(config)
        reported = {p.row for p in problems}
        token = getattr(processor, "image_token", None)
        for i, row in enumerate(dataset):  # standard rows: the processor's image token, one per image
            if i not in reported and not is_conversational(row):
                problems += image_problems(row, i, token, open_files=False)
    if problems:
        raise DataError(sorted(problems, key=lambda p: p.row), method="sft")
    completion_only = fmt == "prompt_completion" if config.completion_only_loss is None else config.completion_only_loss
    if completion_only and fmt != "prompt_completion":
        raise ConfigError(
            "completion_only_loss is true but the dataset is language modeling (text/messages), which has no "
            "completion to restrict the loss to. Use prompt/completion rows, use assistant_only_loss for "
            "conversations, or set completion_only_loss to null."
        )
    if len(dataset) and is_conversational(dataset[0]):
        template = processor.chat_template if with_images else tokenizer.chat_template
        if template is None:
            raise DataError(
                "the dataset is conversational but the tokenizer has no chat template; set "
                "tokenizer.chat_template (in tokenizer_config.json) or use standard (string) rows."
            )
        template = template.get("default", "") if isinstance(template, dict) else template
        if config.assistant_only_loss and not GENERATION_MARKER.search(template):
            raise ConfigError(
                "assistant_only_loss is true but the tokenizer's chat template has no {% generation %} markers, so "
                "transformers cannot tell which tokens the assistant wrote. Wrap each assistant message, end-of-turn "
                "token included, in {% generation %}...{% endgeneration %} in the template, or set "
                "assistant_only_loss false."
            )
    diverged: list[int] = []
    rows = []
    for i, row in enumerate(dataset):
        try:
            rows.append(
                tokenize_row(
                    row, i, tokenizer, completion_only, config.assistant_only_loss, diverged, processor=processor
                )
            )
        except DataError as exc:  # a row the options cannot use: collect them all, then refuse them together
            if not exc.problems:
                raise
            problems += exc.problems
    if problems:
        raise DataError(problems, method="sft")
    if diverged:
        warnings.warn(
            f"{len(diverged)} rows (first: row {diverged[0]}) tokenize their prompt differently alone than followed by "
            "the completion (a chat template that renders a lone prompt differently, or tokens merging across the "
            "boundary); their completion starts where the two tokenizations diverge, as in TRL. Training then sees a "
            "context that differs from inference; end prompts on a token boundary to avoid it.",
            stacklevel=2,
        )
    limit = config.max_length
    if config.packing:  # bins of whole sequences, each cut to max_length first (TRL's bfd)
        rows = [{k: r[k][:limit] for k in ("input_ids", "labels")} for r in rows if r["input_ids"]]
        bins = pack_bfd([len(r["input_ids"]) for r in rows], limit)
        return [
            {
                "input_ids": [t for i in b for t in rows[i]["input_ids"]],
                "labels": [t for i in b for t in rows[i]["labels"]],
                "seq_lengths": [len(rows[i]["input_ids"]) for i in b],
            }
            for b in bins
        ]
    if limit is not None:
        if with_images:
            _refuse_cut_images(rows, limit, image_token_id(processor))
        rows = [_truncated(r, limit) for r in rows]
    kept = [r for r in rows if any(t != IGNORE_INDEX for t in r["labels"])]
    if len(kept) < len(rows):
        warnings.warn(
            f"{len(rows) - len(kept)} of {len(rows)} rows have no loss token left (after truncation to max_length="
            f"{limit}) and are skipped. Raise max_length, or shorten the prompts.",
            stacklevel=2,
        )
    return kept


def _check_image_options(config: SFTConfig) -> None:
    """Options that cannot work with image rows fail before tokenizing (as in TRL)."""
    if config.packing or config.padding_free is True:  # auto keeps image rows padded
        raise ConfigError(
            f"{'packing' if config.packing else 'padding_free'} is true, but the dataset has images: the model matches "
            "image features to image tokens across a whole row, so sequences with images cannot share one. Set "
            "packing and padding_free false for vision-language data."
        )


def _refuse_cut_images(rows: list[dict], limit: int, image_id: int | None) -> None:
    """Truncation must not cut an image's tokens: the model would get more image features than image tokens."""
    problems = [
        RowProblem(
            i,
            "images",
            f"has image tokens beyond max_length={limit} (the row is {len(r['input_ids'])} tokens), so truncation "
            "would cut an image in two",
            "Raise max_length, shorten the text before the images, or use fewer or smaller images.",
        )
        for i, r in enumerate(rows)
        if "images" in r and image_id is not None and image_id in r["input_ids"][limit:]
    ]
    if problems:
        raise DataError(problems, method="sft")


def _truncated(row: dict, limit: int) -> dict:
    out = {**row, "input_ids": row["input_ids"][:limit], "labels": row["labels"][:limit]}
    if "token_inputs" in row:
        out["token_inputs"] = {k: v[:limit] for k, v in row["token_inputs"].items()}
    return out


def collate(rows: list[dict], pad_token_id: int, padding_free: bool, processor: Any = None) -> dict[str, torch.Tensor]:
    """A micro-batch: right-padded ``input_ids``/``attention_mask``/``labels``, or one padding-free row.

    Padding-free concatenates every sequence into a single row whose ``position_ids`` restart at 0 for each
    sequence, with no attention mask: transformers then builds a block-diagonal causal mask from the position
    restarts, so no token attends across a boundary. The first token of each sequence gets label -100 so it is
    never predicted from the end of the previous one; the loss equals the padded batch's.

    Rows with images add the ``processor``'s image tensors (``pixel_values``, ...) and their token-aligned inputs,
    right-padded with 0, all named in ``vision_inputs`` (what :func:`posttrain.vision.model_inputs` passes on).
    """
    if padding_free:
        lengths = [n for r in rows for n in r.get("seq_lengths", [len(r["input_ids"])])]
        input_ids = torch.tensor([t for r in rows for t in r["input_ids"]])[None]  # (1, total)
        labels = torch.tensor([t for r in rows for t in r["labels"]])[None]  # (1, total)
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, total)
        labels[position_ids == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if processor is not None and any(r.get("images") for r in rows):
        extra = image_inputs(processor, [r.get("images", []) for r in rows])
        for name in dict.fromkeys(k for r in rows for k in r.get("token_inputs", {})):
            values = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), 0 = text token and padding
            for i, r in enumerate(rows):
                row_values = r.get("token_inputs", {}).get(name, [])
                values[i, : len(row_values)] = torch.tensor(row_values, dtype=torch.long)
            extra[name] = values
        batch.update(extra)
        batch["vision_inputs"] = sorted(extra)
    return batch
