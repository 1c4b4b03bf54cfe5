"""A learned reward: score each prompt + completion with a sequence-classification model.

The model is a directory written by ``save_pretrained`` (e.g. the output of ``posttrain train reward``)
holding an ``AutoModelForSequenceClassification`` with one label and its tokenizer. Texts are built as
TRL does: ``prompt + completion`` for standard data, the chat template over prompt + completion messages
for conversational data. Models are loaded once per path and process, then kept.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from posttrain.rewards import reward

REWARD_MODEL_ENV = "POSTTRAIN_REWARD_MODEL"
_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def _default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_reward_model(path: str, device: Any = None, dtype: str = "auto"):
    """(model, tokenizer) for ``path``, cached; checks it is a one-label sequence classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device(device) if device is not None else _default_device()
    key = (os.path.abspath(os.path.expanduser(path)), str(device))
    if key not in _CACHE:
        if not os.path.isfile(os.path.join(key[0], "config.json")):
            raise FileNotFoundError(
                f"reward model path {path!r} is not a directory written by save_pretrained "
                "(no config.json there); point at a trained sequence-classification model"
            )
        tokenizer = AutoTokenizer.from_pretrained(key[0])
        model = AutoModelForSequenceClassification.from_pretrained(key[0], dtype=dtype).to(device).eval()
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward model {path!r} has {model.config.num_labels} labels; a reward model has one "
                "(train it with `posttrain train reward`, or num_labels=1)"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # needed to find each row's last token
            model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        _CACHE[key] = (model, tokenizer)
    return _CACHE[key]


def encode(tokenizer: Any, prompt: Any, completion: Any, append_eos: bool = True) -> list[int]:
    """Token ids exactly as posttrain-reward trained the model to score them (its ``encode``).

    Conversational rows go through the chat template; standard rows are ``prompt + completion`` with
    EOS appended when missing and the tokenizer's default special tokens, so the last token, the one
    the head scores, is the same token it saw in training. ``append_eos=False`` scores the bare
    text without special tokens, as TRL 1.16's GRPO/RLOO score a reward model (used for parity).
    """
    if isinstance(prompt, list):
        response = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
    if not append_eos:  # TRL 1.16's reward-model path: the bare text, no special tokens
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text).input_ids)


def score(
    model: Any, tokenizer: Any, prompts: list, completions: list, batch_size: int = 16, append_eos: bool = True
) -> list[float]:
    """The model's scalar output (logit 0) at the last real token of each prompt + completion."""
    import torch

    sequences = [encode(tokenizer, p, c, append_eos) for p, c in zip(prompts, completions)]
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        # right padding: the classifier reads the last non-pad token of each row
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in chunk], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=device)
        with torch.inference_mode():
            out += model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().tolist()
    return out


def make_reward_model_reward(
    path: str, device: Any = None, batch_size: int = 16, dtype: str = "auto", append_eos: bool = True
):
    """A reward scoring completions with the sequence classifier saved at ``path``.

    ``append_eos`` (default) scores each completion as posttrain-reward trained the model; false
    reproduces TRL 1.16's reward-model scoring (bare text, no EOS, no special tokens).

    Example::

        helpful = make_reward_model_reward("runs/reward-model")
        helpful(["Q: 2+2? A:"], [" 4"])  # [1.73]
    """

    def reward_model(prompts: list, completions: list, **columns: Any) -> list[float]:
        model, tokenizer = load_reward_model(path, device, dtype)
        return score(model, tokenizer, prompts, completions, batch_size, append_eos)

    reward_model.path = path
    return reward_model


@dataclass
class RewardModelOptions:
    """Options of the ``reward_model`` reward (``reward_kwargs: {reward_model: {path: ...}}``)."""

    path: str | None = None  # directory of a one-label sequence classifier (e.g. `posttrain train reward` output)
    batch_size: int = 16  # sequences per scoring forward pass
    dtype: str = "auto"  # weights dtype when loading (auto, float32, bfloat16, float16)
    append_eos: bool = True  # score text + EOS as posttrain-reward trains; false: TRL 1.16's bare text


@reward(options=RewardModelOptions)
def reward_model(
    prompts: list,
    completions: list,
    reward_model_path: list | None = None,
    *,
    options: RewardModelOptions | None = None,
    **columns: Any,
) -> list[float]:
    """The registered ``reward_model`` reward. The model path is, first found: the row's
    ``reward_model_path`` column or ``reward_kwargs.reward_model.path``.

    Raises:
        ValueError: when neither gives a path.
    """
    options = options or RewardModelOptions()
    default = options.path
    if default is None:
        default = _env_path()
    paths = [p or default for p in (reward_model_path or [None] * len(completions))]
    if any(p is None for p in paths):
        raise ValueError(
            "the 'reward_model' reward needs the path of a trained reward model: set reward_kwargs: "
            "{reward_model: {path: /path/to/model}} in the config, add a 'reward_model_path' column, or register "
            "make_reward_model_reward('/path') under a name of your own"
        )
    scores: list[float] = [0.0] * len(completions)
    for path in dict.fromkeys(paths):  # one model at a time, in first-seen order
        idx = [i for i, p in enumerate(paths) if p == path]
        model, tokenizer = load_reward_model(path, dtype=options.dtype)
        batch = score(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            [completions[i] for i in idx],
            options.batch_size,
            options.append_eos,
        )
        for i, s in zip(idx, batch):
            scores[i] = s
    return scores


def _env_path() -> str | None:
    """POSTTRAIN_REWARD_MODEL of 1.x: still read, with a warning, until 2.0."""
    value = os.environ.get(REWARD_MODEL_ENV)
    if value is not None:
        warnings.warn(
            f"{REWARD_MODEL_ENV} is deprecated and will be ignored from posttrain-rewards 2.0; set reward_kwargs: "
            "{reward_model: {path: ...}} in the run's config instead (it is then saved with the run).",
            FutureWarning,
            stacklevel=3,
        )
    return value
