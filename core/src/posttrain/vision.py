"""Images in dataset rows, for vision-language models: reading them, checking them, and turning them into model inputs.

A row carries its images in TRL's columns: ``images`` (a list) or ``image`` (one). Each image is a path (relative
paths are read from the dataset file's directory, then from the working directory), raw bytes, a
``{"bytes", "path"}`` mapping (how ``datasets`` stores an ``Image`` feature) or a PIL image. The text says where
each image goes:

- conversational rows: ``{"type": "image"}`` parts in a message's content list (``[{"type": "image"},
  {"type": "text", "text": "What colour is it?"}]``); when every content is a plain string, the images are put
  before the text of the first user message, as TRL does;
- standard rows: the processor's image token (``<image>`` for LLaVA) written in the prompt or text.

What a method does with an image row, the same in every method (SFT, DPO, GRPO)::

    enc = encode(processor, messages, images)            # prepare: token ids with each image's tokens expanded
    batch.update(image_inputs(processor, images_per_row)) # collate: pixel values (+ image grids, masks) per batch
    model(input_ids=..., **model_inputs(batch))          # forward

Token ids are computed once in ``prepare`` (the image processor runs once per row to count each image's
tokens); pixel values are computed again for every micro-batch, so no pixel values are held in memory. Inputs
aligned with the tokens (``mm_token_type_ids`` of Qwen2-VL, ``token_type_ids`` of Gemma 3) come back in
``token_inputs`` and are padded with 0 like the ids.

.. versionadded:: 1.0
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain._errors import ConfigError, RowProblem

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = [
    "FREEZE_CHOICES",
    "IMAGE_COLUMNS",
    "PROJECTOR_MODULES",
    "VISION_MODULES",
    "Freeze",
    "encode",
    "freeze_parts",
    "has_images",
    "image_inputs",
    "image_problems",
    "image_token_id",
    "is_vision_language_model",
    "load_image",
    "model_inputs",
    "multimodal_messages",
    "parameter_part",
    "resolve_image_paths",
    "row_images",
]

IMAGE_COLUMNS = ("images", "image")
"""The columns a row may hold its images in (TRL's names): ``images`` (a list) or ``image`` (one image).

.. versionadded:: 1.0
"""
Freeze = Literal["none", "vision", "vision_and_projector"]
"""The type of the ``freeze`` config field (see :data:`FREEZE_CHOICES`).

.. versionadded:: 1.0
"""
FREEZE_CHOICES: tuple[str, ...] = ("none", "vision", "vision_and_projector")
"""Values of the ``freeze`` config field: train everything, everything but the vision tower, or the language
model only.

.. versionadded:: 1.0
"""
VISION_MODULES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
"""Module names that hold a vision-language model's vision tower in transformers (LLaVA, Gemma 3, PaliGemma,
InternVL: ``vision_tower``; Idefics3, SmolVLM, Mllama: ``vision_model``; Qwen2-VL and Qwen2.5-VL: ``visual``).

.. versionadded:: 1.0
"""
PROJECTOR_MODULES = ("multi_modal_projector", "connector", "merger", "mm_projector", "aligner")
"""Module names of the projector between the vision tower and the language model (Qwen2-VL's ``merger`` sits
inside ``visual`` and counts as the projector).

.. versionadded:: 1.0
"""
_NOT_TOKEN_INPUTS = ("input_ids", "attention_mask", "assistant_masks", "labels")


# -- rows ------------------------------------------------------------------------------------------------------


def row_images(row: dict) -> list:
    """The images of a row as a list (``images``, else ``[image]``, else ``[]``); values are not opened.

    .. versionadded:: 1.0
    """
    images = row.get("images")
    if images is None and row.get("image") is not None:
        return [row["image"]]
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def has_images(rows: Any) -> bool:
    """Whether any row of a dataset (or list of rows) carries an image.

    .. versionadded:: 1.0
    """
    columns = rows.column_names if hasattr(rows, "column_names") else {k for r in rows for k in r}
    if not set(IMAGE_COLUMNS) & set(columns):
        return False
    return any(row_images(row) for row in rows)


def load_image(value: Any) -> Image.Image:
    """Open one image value (path, bytes, ``{"bytes", "path"}`` or PIL image) as an RGB PIL image.

    Every image is converted to RGB: processors expect three channels, and a PNG with transparency or a
    greyscale JPEG would otherwise reach them as RGBA or L.

    Raises:
        ValueError: the value is of an unknown kind, the file is missing, or PIL cannot decode it; the message
            says which.

    .. versionadded:: 1.0
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ConfigError(
            "the dataset has images but Pillow is not installed; run `pip install 'posttrain[vision]'`."
        ) from None
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):  # datasets' Image feature, undecoded: bytes win over the path, as in datasets
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            source: Any = io.BytesIO(value)
        elif isinstance(value, (str, Path)):
            if str(value).startswith(("http://", "https://")):
                raise ValueError(f"{str(value)!r} is a URL; images are read from local files, so download it first")
            source = Path(value).expanduser()
            if not source.is_file():
                raise ValueError(f"image file {str(value)!r} does not exist")
        else:
            raise ValueError(f"{type(value).__name__} is not an image (a path, bytes or a PIL image)")
        try:
            image = Image.open(source)
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            where = repr(str(value)) if isinstance(value, (str, Path)) else f"{len(value)} bytes"
            raise ValueError(f"{where} cannot be read as an image ({exc})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def resolve_image_paths(rows: Any, base_dir: str | Path) -> Any:
    """Make relative image paths absolute: the dataset file's directory ``base_dir`` first, then the working
    directory when only the latter holds the file. Returns the same kind it is given (a ``datasets.Dataset`` or
    a list of rows); rows without string paths are returned unchanged.

    .. versionadded:: 1.0
    """
    base = Path(base_dir).expanduser()

    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith(("http://", "https://")):
            return value
        path = Path(value).expanduser()
        if path.is_absolute() or (not (base / path).exists() and path.exists()):
            return str(path.absolute()) if not path.is_absolute() else value
        return str((base / path).absolute())

    def fix(row: dict) -> dict:
        out = {}
        for column in IMAGE_COLUMNS:
            value = row.get(column)
            if isinstance(value, list):
                out[column] = [resolve(v) for v in value]
            elif value is not None:
                out[column] = resolve(value)
        return out

    if hasattr(rows, "column_names"):
        columns = [c for c in IMAGE_COLUMNS if c in rows.column_names]
        if not columns or not any(_holds_strings(rows.features[c]) for c in columns):
            return rows
        return rows.map(fix, desc="Resolving image paths")
    return [{**row, **fix(row)} for row in rows]


def _holds_strings(feature: Any) -> bool:
    """Whether a ``datasets`` feature is a string or a list of strings (paths to resolve)."""
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list):
        inner = feature[0] if feature else None
    target = inner if inner is not None else feature
    return getattr(target, "dtype", None) in ("string", "large_string")


# -- validation ---------------------------------------------------------------------------------------------------


def _parts(content: Any) -> list[dict]:
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def _placeholder_count(messages: list, n_images: int) -> tuple[int, bool]:
    """(image placeholders the messages will hold, whether a user message has string content), counting the
    placeholders TRL inserts: every image goes before the text of the first user message with string content."""
    explicit = sum(1 for m in messages for p in _parts(m.get("content")) if p.get("type") == "image")
    has_string_user = any(m.get("role") == "user" and isinstance(m.get("content"), str) for m in messages)
    return explicit + (n_images if has_string_user else 0), has_string_user


def _message_column(row: dict) -> str | None:
    """The column whose messages the images belong to: the prompt, else the conversation (or an implicit prompt)."""
    for column in ("prompt", "messages", "chosen"):
        if isinstance(row.get(column), list):
            return column
    return None


def image_problems(row: dict, index: int, image_token: str | None = None, open_files: bool = True) -> list[RowProblem]:
    """Everything wrong with a row's images: the column's type, missing or unreadable files, and the number of
    images against the number of places the text gives them.

    Conversational rows count their ``{"type": "image"}`` parts (plus the images TRL inserts into a user message
    with string content); standard rows count ``image_token`` in their prompt or text, when it is given (the
    processor knows it; ``posttrain check-data`` does not load one, so it checks conversational rows only).

    Args:
        row: one dataset row.
        index: its index, for the :class:`~posttrain.RowProblem`.
        image_token: the processor's image placeholder string (``"<image>"``), or None.
        open_files: decode every image (a full read); False checks only that paths exist.

    .. versionadded:: 1.0
    """
    column = "images" if row.get("images") is not None else "image"
    raw = row.get(column)
    if raw is None:
        return []
    if column == "images" and not isinstance(raw, (list, tuple)):
        return [
            RowProblem(
                index,
                "images",
                f"must be a list of images, got {type(raw).__name__}",
                'Write "images": [...] (a list, even for one image), or use the single-image column "image".',
            )
        ]
    images = row_images(row)
    problems = []
    for k, value in enumerate(images):
        try:
            if open_files:
                load_image(value)
            elif isinstance(value, str) and not Path(value).expanduser().is_file():
                raise ValueError(f"image file {value!r} does not exist")
        except ValueError as exc:
            fix = (
                "Fix the path (relative paths are read from the dataset file's directory, then the working "
                "directory) or remove the row."
                if isinstance(value, (str, Path))
                else "Replace it with a readable PNG or JPEG image, or remove the row."
            )
            problems.append(RowProblem(index, column, f"image {k}: {exc}", fix))
    message_column = _message_column(row)
    if message_column is not None:
        messages = row[message_column]
        expected, has_string_user = _placeholder_count(messages, len(images))
        if images and not expected and not has_string_user:
            problems.append(
                RowProblem(
                    index,
                    column,
                    f"holds {len(images)} image(s) but {message_column!r} has no user message to put them in and "
                    'no {"type": "image"} part',
                    f'Add {{"type": "image"}} parts where the images go in {message_column!r}, or a user message.',
                )
            )
        elif expected != len(images):
            problems.append(
                RowProblem(
                    index,
                    column,
                    f"holds {len(images)} image(s) but {message_column!r} has {expected} image placeholder(s)",
                    'Give one {"type": "image"} content part per image (or plain-string user messages, which get '
                    "every image before their text), or fix the images list.",
                )
            )
    elif image_token is not None:
        text_column = next((c for c in ("prompt", "text", "chosen") if isinstance(row.get(c), str)), None)
        if text_column is not None:
            found = row[text_column].count(image_token)
            if found != len(images):
                problems.append(
                    RowProblem(
                        index,
                        column,
                        f"holds {len(images)} image(s) but {text_column!r} has {found} image token(s) {image_token!r}",
                        f"Write {image_token!r} in the text once per image, where the image goes.",
                    )
                )
    return problems


# -- text and tokens ------------------------------------------------------------------------------------------


def multimodal_messages(messages: list[dict], n_images: int = 0) -> list[dict]:
    """Messages with list content: ``{"type": "text", "text": ...}`` parts, and ``n_images`` ``{"type": "image"}``
    parts put before the text of the first user message with string content (TRL's
    ``prepare_multimodal_messages``, without the images themselves). Messages already in list form are kept.

    .. versionadded:: 1.0
    """
    out, placed = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message.get("role") == "user" and not placed:
                parts = [{"type": "image"} for _ in range(n_images)] + parts
                placed = True
            message = {**message, "content": parts}
        else:
            message = {**message, "content": [dict(p) for p in (content or [])]}
        out.append(message)
    return out


def encode(
    processor: Any,
    text: str | list[dict],
    images: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    assistant_mask: bool = False,
    add_special_tokens: bool | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """Token ids of one row's text with its images' tokens expanded, as the model expects them.

    A list of messages is rendered with the processor's chat template (``tools`` and other
    ``template_kwargs`` passed on) and tokenized without adding special tokens (the template has them); a
    string is tokenized with them unless ``add_special_tokens`` says otherwise.

    Returns:
        ``{"input_ids": list[int], "token_inputs": {name: list[int]}}`` and, with ``assistant_mask``,
        ``"assistant_masks": list[int]`` (1 on tokens inside the template's ``{% generation %}`` blocks).
        ``token_inputs`` holds the processor's outputs aligned with the tokens (``mm_token_type_ids``,
        ``token_type_ids``), empty for most models.

    .. versionadded:: 1.0
    """
    pictures = [load_image(v) for v in images] or None
    if isinstance(text, list):
        messages = multimodal_messages(text, len(images))
        special = False if add_special_tokens is None else add_special_tokens
        kwargs: dict[str, Any] = {"add_special_tokens": special, "return_tensors": "pt"}
        if pictures:
            kwargs["images"] = pictures
        out = processor.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=assistant_mask,
            processor_kwargs=kwargs,
            **template_kwargs,
        )
    else:
        special = True if add_special_tokens is None else add_special_tokens
        out = processor(
            text=[text], images=[pictures] if pictures else None, add_special_tokens=special, return_tensors="pt"
        )
    input_ids = out["input_ids"]
    width = input_ids.shape[-1]
    encoded: dict[str, Any] = {"input_ids": input_ids[0].tolist(), "token_inputs": {}}
    for name, value in out.items():
        if name in _NOT_TOKEN_INPUTS or not hasattr(value, "shape"):
            continue
        if tuple(value.shape) == (1, width):  # aligned with the tokens: padded like them later
            encoded["token_inputs"][name] = value[0].tolist()
    if assistant_mask:
        mask = out["assistant_masks"]
        encoded["assistant_masks"] = list(mask[0].tolist() if hasattr(mask, "tolist") else mask[0])
    return encoded


def image_token_id(processor: Any) -> int | None:
    """The id of the token each image's features replace (``<image>``, ``<|image_pad|>``), or None.

    .. versionadded:: 1.0
    """
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


# -- batches --------------------------------------------------------------------------------------------------


def image_inputs(processor: Any, images_per_row: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """The image tensors of a micro-batch: the processor's image processor over every row's images, in row order.

    Returns whatever the model's image processor makes (``pixel_values`` always; ``image_grid_thw`` for
    Qwen2-VL, ``pixel_attention_mask`` for Idefics3, ``image_sizes`` for LLaVA-NeXT), as tensors, or an empty
    dict when no row has an image. The model matches image features to image tokens in order, so rows without
    images are simply left out.

    .. versionadded:: 1.0
    """
    nested = [[load_image(v) for v in row] for row in images_per_row if len(row)]
    if not nested:
        return {}
    out = processor.image_processor(images=nested, return_tensors="pt")
    return {name: value for name, value in out.items() if hasattr(value, "shape")}


def model_inputs(batch: dict) -> dict[str, Any]:
    """The image entries of a batch to pass to the model's forward: the names listed in ``batch["vision_inputs"]``
    (set by the method's collate), or an empty dict for a text batch.

    .. versionadded:: 1.0
    """
    return {name: batch[name] for name in batch.get("vision_inputs", ())}


# -- models ---------------------------------------------------------------------------------------------------


def is_vision_language_model(source: Any, trust_remote_code: bool = False) -> bool:
    """Whether a model (a directory, a hub name, a config or a model) takes images: its config has a
    ``vision_config``, as every transformers vision-language model's does.

    .. versionadded:: 1.0
    """
    config = getattr(source, "config", source)
    if isinstance(source, (str, Path)):
        if not str(source):
            return False
        path = Path(source).expanduser() / "config.json"
        if path.is_file():
            import json

            try:
                return "vision_config" in json.loads(path.read_text())
            except (OSError, ValueError):
                return False
        try:
            from transformers import AutoConfig

            from posttrain.models import _check_path

            # a path typo, or a hub name offline or unreachable, fails here at once (no round of hub retries)
            kwargs = _check_path(str(source))
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code, **kwargs)
        except Exception:  # not a model we can read: the loader reports it with its own message
            return False
    return getattr(config, "vision_config", None) is not None


def parameter_part(name: str) -> Literal["vision", "projector", "language"]:
    """Which part of a vision-language model a parameter belongs to, from its name: a ``PROJECTOR_MODULES``
    component makes it the projector (checked first: Qwen2-VL's ``visual.merger``), a ``VISION_MODULES``
    component the vision tower, anything else the language model (embeddings and LM head included).

    .. versionadded:: 1.0
    """
    components = name.split(".")
    if any(c in PROJECTOR_MODULES for c in components):
        return "projector"
    if any(c in VISION_MODULES for c in components):
        return "vision"
    return "language"


def freeze_parts(model: Any, freeze: str) -> list[str]:
    """Stop gradients to the parts ``freeze`` names (``"vision"``: the vision tower; ``"vision_and_projector"``:
    the tower and the projector) and return the names of the frozen parameters. ``"none"`` changes nothing.

    Raises:
        ConfigError: ``freeze`` asks for a part the model does not have (a text-only model, or a vision-language
            model whose modules use names this module does not know).

    .. versionadded:: 1.0
    """
    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {freeze!r}")
    if freeze == "none":
        return []
    parts = {"vision"} if freeze == "vision" else {"vision", "projector"}
    frozen = []
    seen = {"vision": False, "projector": False}
    for name, parameter in model.named_parameters():
        part = parameter_part(name)
        if part in seen:
            seen[part] = True
        if part in parts:
            parameter.requires_grad_(False)
            frozen.append(name)
    missing = [p for p in sorted(parts) if not seen[p]]
    if missing:
        kind = type(model).__name__
        raise ConfigError(
            f"freeze is {freeze!r} but the model ({kind}) has no {' or '.join(missing)} module: no parameter name "
            f"contains {', '.join(VISION_MODULES if 'vision' in missing else PROJECTOR_MODULES)}. Set freeze to "
            "'none' for a text-only model, or freeze the modules yourself before calling posttrain.train."
        )
    return frozen
