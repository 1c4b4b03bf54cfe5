"""``posttrain generate MODEL_DIR --prompt TEXT``: try a model without writing Python.

The prompt goes through the tokenizer's chat template when it has one (``--raw`` sends it as
plain text), the completion is printed token by token as it is generated, and sampling follows
the model's ``generation_config`` unless a flag says otherwise (``--temperature 0`` is greedy).
The helpers here are shared with ``posttrain chat``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from posttrain._errors import PosttrainError


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``generate`` and ``chat``: where the model runs and how it samples."""
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory saved with save_pretrained (a run's output_dir)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens generated per answer (default 256)")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 means greedy (default: the model's)")
    p.add_argument(
        "--top_p", type=float, help="nucleus sampling: keep the smallest set with this mass (default: model's)"
    )
    p.add_argument("--top_k", type=int, help="sample among the k likeliest tokens; 0 disables (default: the model's)")
    p.add_argument("--seed", type=int, help="seed for sampling, for a reproducible answer")
    p.add_argument("--system", help="a system message put before the conversation (chat template only)")
    p.add_argument("--raw", action="store_true", help="ignore the chat template: the prompt is plain text")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights' dtype; auto: bfloat16 on a GPU that has it, else float32",
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code (only if you trust it)")


def _check_model_dir(path: Path) -> None:
    """A clear error for what users commonly pass instead of a model directory."""
    if not path.exists():
        raise PosttrainError(
            f"model directory {str(path)!r} does not exist; pass a directory saved with save_pretrained, such as a "
            "run's output_dir."
        )
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if checkpoints:
        raise PosttrainError(
            f"{str(path)!r} holds checkpoints but no final model (the run did not finish); pass a checkpoint, "
            f"e.g. {checkpoints[-1]}."
        )
    raise PosttrainError(
        f"{str(path)!r} has no config.json, so it is not a transformers model directory; pass the directory "
        "save_pretrained wrote (a run's output_dir)."
    )


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise PosttrainError(f"--device {name} was asked for, but CUDA is not available here; use --device cpu.")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) for generation: eval mode, on the chosen device and dtype."""
    from types import SimpleNamespace

    import torch
    from transformers.utils import logging as hf_logging

    from posttrain.models import load_causal_lm, load_tokenizer

    hf_logging.disable_progress_bar()  # the answer is the output; no loading bars around it
    path = Path(args.model_dir).expanduser()
    _check_model_dir(path)
    device = pick_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    settings = SimpleNamespace(
        dtype=dtype, trust_remote_code=args.trust_remote_code, attn_implementation=None, gradient_checkpointing=False
    )
    tokenizer = load_tokenizer(str(path), trust_remote_code=args.trust_remote_code)
    if (path / "config.json").is_file():
        model = load_causal_lm(str(path), settings)
    else:  # a LoRA run saves only its adapters; the base model path is recorded in adapter_config.json
        try:
            from peft import AutoPeftModelForCausalLM
        except ImportError:
            raise PosttrainError(
                f"{str(path)!r} holds LoRA adapters, and loading them needs peft: `pip install 'posttrain[peft]'`."
            ) from None
        model = AutoPeftModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), trust_remote_code=args.trust_remote_code
        )
    model.to(device).eval()
    return model, tokenizer, device


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """``generate`` keyword arguments from the flags; what no flag sets comes from the model's generation_config."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.max_new_tokens < 1:
        raise PosttrainError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise PosttrainError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise PosttrainError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise PosttrainError(f"--top_k must be >= 0 (0 disables it), got {args.top_k}")
    if args.temperature == 0:
        return {**kwargs, "do_sample": False}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.top_k is not None:
        kwargs["top_k"] = args.top_k
    if len(kwargs) > 1:  # a sampling flag was given: sample, whatever the model's default
        kwargs["do_sample"] = True
    return kwargs


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer: Any, messages: list[dict], raw_text: str | None = None) -> list[int]:
    """Token ids of the prompt: the chat template with a generation prompt, or ``raw_text`` as is."""
    if raw_text is not None:
        return tokenizer(raw_text).input_ids
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds any BOS


class TokenPrinter:
    """A transformers streamer that writes each new piece of text as soon as its token is generated.

    It decodes the whole completion each time and writes what is new, so a character split over
    several tokens (UTF-8 pieces) is written once it is whole.
    """

    def __init__(self, tokenizer: Any, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._write(final=False)

    def end(self) -> None:
        self._write(final=True)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or not text.startswith(self.text)):
            return  # half a character, or the decoder rewrote earlier text: wait for more tokens
        new = text[len(self.text) :] if text.startswith(self.text) else ""
        if new:
            self.out.write(new)
            self.out.flush()
        self.text = text


def stream(model: Any, tokenizer: Any, prompt_ids: list[int], kwargs: dict, out: TextIO) -> str:
    """Generate from ``prompt_ids``, writing text to ``out`` as it comes; return the completion's text.

    Ctrl-C stops the generation; the text so far is returned.
    """
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    printer = TokenPrinter(tokenizer, out)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=tokenizer.pad_token_id,
                streamer=printer,
                **kwargs,
            )
    except KeyboardInterrupt:
        printer.end()
        out.write(" [stopped]")
    return printer.text


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain generate",
        description="Generate a completion from a model directory, printed token by token. The prompt goes "
        "through the tokenizer's chat template when it has one.",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads it from stdin")
    args = p.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kwargs = sampling_kwargs(args)
    model, tokenizer, _device = load(args)
    if args.raw or not has_chat_template(tokenizer):
        if args.system:
            why = "--raw was given" if args.raw else f"the tokenizer in {args.model_dir} has none"
            raise PosttrainError(f"--system needs a chat template, but {why}; put the instructions in --prompt.")
        prompt_ids = encode(tokenizer, [], raw_text=prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt_ids = encode(tokenizer, messages)
    seed_everything(args.seed)
    stream(model, tokenizer, prompt_ids, kwargs, sys.stdout)
    sys.stdout.write("\n")
    return 0
