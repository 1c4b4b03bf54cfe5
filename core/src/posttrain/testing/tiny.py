"""Build tiny random models and a local character tokenizer: no hub, a few hundred KB, seconds on CPU.

Used by the test suites, the conformance kit, the examples and ``posttrain demo``::

    from posttrain.testing import build_tiny_model
    path = build_tiny_model("/tmp/tiny")          # a directory from_pretrained can load
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = list(string.ascii_letters + string.digits + string.punctuation + " \n")

#: ChatML-like template; the {% generation %} markers let SFT train on assistant turns only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""The chat template of :func:`build_tokenizer`: ``<|role|>content<|end|>`` per message, assistant turns
marked for ``return_assistant_tokens_mask``.

.. versionadded:: 0.1
"""


def build_tokenizer(extra_characters: str = ""):
    """A character-level ``PreTrainedTokenizerFast`` with pad/EOS tokens and a chat template.

    .. versionadded:: 0.1
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = CHARACTERS + [c for c in dict.fromkeys(extra_characters) if c not in CHARACTERS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | Path,
    architecture: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    tokenizer=None,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a random tiny causal LM plus the character tokenizer (or ``tokenizer``) to ``path`` and return it.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 ``max_position_embeddings`` (rows longer than 512 tokens).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tokenizer()
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
