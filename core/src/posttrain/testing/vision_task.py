"""A tiny vision-language model and a synthetic image task: "what colour is the shape?".

``build_tiny_vlm`` writes a random LLaVA (a one-layer CLIP vision tower, the two-layer projector and a two-layer
Llama) with a processor built from the character tokenizer of :mod:`posttrain.testing.tiny` plus the ``<image>``
token and a CLIP image processor: no hub, no torchvision, ~40k parameters, four tokens per image, milliseconds
per step on CPU.
``shape_image`` draws a coloured square or disc at a random place on a noisy grey background, so the colour is
the only thing an answer can depend on; ``colour_rows`` makes rows of every dataset format around it::

    path = build_tiny_vlm("/tmp/vlm")
    rows = colour_rows(64, "prompt_completion", seed=0)   # {"images": [PIL], "prompt": [...], "completion": [...]}

.. versionadded:: 1.0
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 20),
}
"""The colours of :func:`shape_image` and their RGB values; a random answer is right one time in four.

.. versionadded:: 1.0
"""
IMAGE_SIZE = 32
"""Side of the square images, in pixels (the tiny CLIP tower sees 2 x 2 patches of 16 pixels: four tokens).

.. versionadded:: 1.0
"""
QUESTION = "What colour is the shape?"
"""The question every row of :func:`colour_rows` asks.

.. versionadded:: 1.0
"""

#: Renders string content or content parts; an image part becomes ``<image>``, which the processor expands into one
#: token per image patch. Assistant turns are wrapped in {% generation %} for assistant-only loss.
VISION_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ render(message['content']) + '<|end|>' }}"
    "{% endgeneration %}"
    "{%- else -%}{{ render(message['content']) + '<|end|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
"""The chat template of :func:`build_tiny_vlm`'s processor (``<|role|>content<|end|>`` per message).

.. versionadded:: 1.0
"""


def shape_image(colour: str, rng: random.Random, size: int = IMAGE_SIZE):
    """A ``size`` x ``size`` RGB image: noisy grey background, one ``colour`` square or disc of random size and place.

    .. versionadded:: 1.0
    """
    from PIL import Image, ImageDraw

    background = [rng.randrange(100, 160) for _ in range(size * size)]
    image = Image.new("RGB", (size, size))
    image.putdata([(v, v, v) for v in background])
    side = rng.randrange(size // 2, size * 3 // 4)
    x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
    draw = ImageDraw.Draw(image)
    box = (x, y, x + side - 1, y + side - 1)
    if rng.random() < 0.5:
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.ellipse(box, fill=COLOURS[colour])
    return image


def colour_rows(n: int, fmt: str = "prompt_completion", seed: int = 0, conversational: bool = True) -> list[dict]:
    """``n`` rows asking for the colour of the shape in their image, in dataset format ``fmt``.

    Colours cycle, so any ``len(COLOURS)`` consecutive rows hold each once; ``answer`` holds the right colour in
    every format (for rewards and for tests). Every third row carries a second image of the same colour
    (``"Both shapes: "`` prefixes the question), so batches mix rows with one and two images.

    Args:
        fmt: ``language_modeling`` (``messages``), ``prompt_completion``, ``preference`` (a wrong colour as
            ``rejected``) or ``prompt_only``.
        conversational: message lists with ``{"type": "image"}`` parts (True), or standard strings with the
            ``<image>`` token (False).

    .. versionadded:: 1.0
    """
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        wrong = names[(i + 1 + rng.randrange(len(names) - 1)) % len(names)]
        count = 2 if i % 3 == 2 else 1
        images = [shape_image(colour, rng) for _ in range(count)]
        question = ("Both shapes: " if count == 2 else "") + QUESTION
        if conversational:
            prompt: Any = [
                {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}
            ]
            # content parts in every message: a dataset column cannot mix string and list contents (Arrow)
            chosen: Any = [{"role": "assistant", "content": [{"type": "text", "text": colour}]}]
            rejected: Any = [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]
        else:
            prompt, chosen, rejected = "<image>" * count + question + " ", colour, wrong
        row: dict[str, Any] = {"images": images}
        if fmt == "language_modeling":
            row["messages" if conversational else "text"] = prompt + chosen
        elif fmt == "prompt_completion":
            row.update(prompt=prompt, completion=chosen)
        elif fmt == "preference":
            row.update(prompt=prompt, chosen=chosen, rejected=rejected)
        elif fmt == "prompt_only":
            row["prompt"] = prompt
        else:
            raise ValueError(
                f"unknown format {fmt!r}; use language_modeling, prompt_completion, preference or prompt_only"
            )
        row["answer"] = colour
        rows.append(row)
    return rows


def build_tiny_vlm(path: str | Path, seed: int = 0, hidden_size: int = 32, vision_hidden_size: int = 32) -> Path:
    """Write a random tiny LLaVA and its processor to ``path`` (a directory ``from_pretrained`` and
    ``AutoProcessor`` load) and return it; reused when ``config.json`` is already there.

    .. versionadded:: 1.0
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from posttrain.testing.tiny import build_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    patch = 16
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",  # drop the CLS feature: one token per patch
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def colour_logps(model: Any, processor: Any, rows: list[dict]) -> torch.Tensor:
    """Log-probability of each colour answer (its text and end-of-turn token) for each conversational row's prompt:
    a noise-free measure of what the model learnt, with no sampling.

    Args:
        model: a vision-language model (in eval mode, on CPU or any device).
        processor: its processor.
        rows: rows of :func:`colour_rows` with a conversational ``prompt``.

    Returns:
        A (len(rows), len(COLOURS)) float tensor, columns in :data:`COLOURS` order; the right colour's column is
        ``list(COLOURS).index(row["answer"])``.

    .. versionadded:: 1.0
    """
    import torch

    from posttrain.vision import encode, image_inputs

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = encode(processor, row["prompt"], row["images"], add_generation_prompt=True)["input_ids"]
            answers = [processor.tokenizer(c + "<|end|>", add_special_tokens=False).input_ids for c in COLOURS]
            width = len(prompt) + max(len(a) for a in answers)
            pad = processor.tokenizer.pad_token_id
            ids = torch.tensor([prompt + a + [pad] * (width - len(prompt) - len(a)) for a in answers], device=device)
            mask = torch.tensor([[1] * (len(prompt) + len(a)) + [0] * (width - len(prompt) - len(a)) for a in answers])
            pixels = image_inputs(processor, [row["images"]] * len(answers))
            logits = model(
                input_ids=ids, attention_mask=mask.to(device), **{k: v.to(device) for k, v in pixels.items()}
            ).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (K, T-1)
            scored = torch.zeros_like(logps)
            for k, a in enumerate(answers):
                scored[k, len(prompt) - 1 : len(prompt) - 1 + len(a)] = 1  # position t predicts token t + 1
            out.append((logps * scored).sum(-1).cpu())
    return torch.stack(out)


def colour_exact(prompts: list, completions: list, answer: list[str], **columns: Any) -> list[float]:
    """Exact-match verifier for :func:`colour_rows`: 1.0 when the completion (stripped) is the ``answer`` colour.

    Completions are strings (standard prompts) or ``[{"role": "assistant", "content": text}]`` (chat prompts).

    .. versionadded:: 1.0
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t.strip() == a) for t, a in zip(texts, answer)]


def build_colour_vlm(path: str | Path, seed: int = 0, sft_steps: int = 100, right_fraction: float = 0.0) -> Path:
    """A tiny vision-language model at ``path/colour`` that answers "what colour is the shape?" with a colour
    name and ``<|end|>``, the right colour only part of the time: with the default 100 steps and
    ``right_fraction=0`` the colour is drawn at random, not read from the image, and it samples exactly the right
    answer about one time in five (a quarter of the ~80% of answers that are well formed).

    The answer format is taught by a short cross-entropy loop on :func:`colour_rows` prompts whose targets are the
    right colour with probability ``right_fraction`` and a random colour otherwise, so a reinforcement-learning
    test starts from a model that samples colour names (an exact-match reward is not always zero) and has to read
    the image better to raise it. Runs in one torch thread (restored afterwards) so the result does not depend on
    the caller's setting.

    .. versionadded:: 1.0
    .. versionchanged:: 1.0
       ``right_fraction``: a policy that already reads the image a little (GRPO's learning test).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.vision import encode, image_inputs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = Path(path) / ("colour" if not right_fraction else f"colour-{right_fraction:g}-{sft_steps}")
        if (out / "config.json").is_file():
            return out
        base = build_tiny_vlm(Path(path) / "model", seed=seed)
        processor = AutoProcessor.from_pretrained(base)
        model = AutoModelForImageTextToText.from_pretrained(base)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pad = processor.tokenizer.pad_token_id
        rows = colour_rows(32, "prompt_only", seed=seed + 1)
        prompts = [encode(processor, r["prompt"], r["images"], add_generation_prompt=True)["input_ids"] for r in rows]
        answers = {c: processor.tokenizer(c + "<|end|>", add_special_tokens=False).input_ids for c in COLOURS}
        for _ in range(sft_steps):
            picked = rng.sample(range(len(rows)), 8)
            # the right colour with probability right_fraction, else one independent of the image
            targets = [
                answers[
                    rows[i]["answer"] if right_fraction and rng.random() < right_fraction else rng.choice(list(COLOURS))
                ]
                for i in picked
            ]
            seqs = [prompts[i] + t for i, t in zip(picked, targets)]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            labels = torch.full_like(ids, -100)
            for k, (i, t) in enumerate(zip(picked, targets)):
                labels[k, len(prompts[i]) : len(prompts[i]) + len(t)] = torch.tensor(t)
            mask = (labels != -100) | (
                torch.arange(width)[None] < torch.tensor([len(prompts[i]) for i in picked])[:, None]
            )
            pixels = image_inputs(processor, [rows[i]["images"] for i in picked])
            logits = model(input_ids=ids, attention_mask=mask.long(), **pixels).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.save_pretrained(out)
        processor.save_pretrained(out)
        return out
    finally:
        torch.set_num_threads(threads)


def colour_exact_probability(model_dir: str | Path, rows: list[dict]) -> float:
    """Mean over ``rows`` (conversational :func:`colour_rows`) of the probability that the model samples exactly
    the right colour and ``<|end|>`` at temperature 1: the expected :func:`colour_exact` reward, computed from the
    logits with no sampling noise.

    .. versionadded:: 1.0
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    logps = colour_logps(model, AutoProcessor.from_pretrained(model_dir), rows).double()
    right = torch.tensor([list(COLOURS).index(r["answer"]) for r in rows])
    return float(logps.gather(1, right[:, None]).exp().mean())
