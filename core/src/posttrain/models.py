"""Model, tokenizer, LoRA, reference-model and teacher-model helpers (transformers + peft)."""

from __future__ import annotations

import contextlib
import copy
import pickle
import re
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError, PosttrainError

__all__ = [
    "VARLEN_ATTENTION",
    "apply_peft",
    "check_packed_attention",
    "disable_dropout",
    "eval_mode",
    "frozen_copy",
    "is_peft_model",
    "load_causal_lm",
    "load_processor",
    "load_teacher",
    "load_tokenizer",
    "pack_batch",
    "reference_forward",
    "reference_model",
    "resolve_padding_free",
]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _check_path(path: str, what: str = "model") -> dict:
    """Refuse a path that cannot be a model, fast and in one line; return ``from_pretrained`` keyword arguments.

    A name that does not exist locally is a hub name only if it is shaped like one (``org/name`` or ``name``,
    and ``org`` is not a local directory); otherwise it is a path typo and "does not exist". A hub name is
    refused at once when offline (``HF_HUB_OFFLINE=1``) or when the hub cannot be reached, instead of after
    a minute of retries.
    """
    if not path:
        raise ConfigError(f"no {what} given; pass --{what} PATH (a local directory saved with save_pretrained)")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise PosttrainError(
                f"{what} path {path!r} has no config.json, so it is not a transformers model directory; "
                "point at the directory that save_pretrained wrote."
            )
        return {}
    first = path.split("/", 1)[0]
    if not _HUB_ID.match(path) or path.startswith((".", "~")) or (("/" in path) and Path(first).is_dir()):
        raise PosttrainError(
            f"{what} path {path!r} does not exist (relative to {Path.cwd()}); pass a directory saved with "
            "save_pretrained, or a hub name such as 'org/model'."
        )
    return _hub_kwargs(path, what)


def _hub_kwargs(name: str, what: str) -> dict:
    """``local_files_only`` when the hub is unreachable but the files are cached; a one-line error otherwise."""
    from posttrain._preflight import hub_unavailable

    reason = hub_unavailable()
    if reason is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise PosttrainError(
        f"{what} {name!r} is not a local directory (none at {Path.cwd() / name}) and is not in the hub cache, and "
        f"{reason}, so it cannot be downloaded. Check the path, or download the model where there is network "
        "(`huggingface-cli download NAME`) and pass its directory."
    )


def _model_type(path: str) -> str:
    import json

    try:
        return str(json.loads((Path(path).expanduser() / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _position_limit(model_config: Any) -> int | None:
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    limit = get("max_position_embeddings") or get("n_positions")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _lengths(config: Any) -> dict[str, int]:
    lengths = {}
    if isinstance(getattr(config, "max_length", None), int):
        lengths["max_length"] = config.max_length
    prompt, completion = getattr(config, "max_prompt_length", None), getattr(config, "max_completion_length", None)
    if isinstance(prompt, int) and isinstance(completion, int):
        lengths["max_prompt_length + max_completion_length"] = prompt + completion
    return lengths


def fit_max_length(config: Any) -> None:
    """Before the model loads: a ``max_length`` longer than the model's position table (read from its
    config.json) is refused when the user set it, and lowered to the table's size, with a warning, when it is
    the method's default. A local model directory only; :func:`check_max_length` covers the rest."""
    import dataclasses
    import json
    import warnings

    path = Path(getattr(config, "model", "") or "").expanduser()
    try:
        limit = _position_limit(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return
    default = next((f.default for f in dataclasses.fields(config) if f.name == "max_length"), None)
    value = getattr(config, "max_length", None)
    if limit is not None and isinstance(value, int) and value > limit and value == default:
        warnings.warn(
            f"max_length defaults to {value} but the model at {str(path)!r} has positions for {limit} tokens "
            f"(max_position_embeddings); using max_length {limit}. Set --max_length to choose another value.",
            UserWarning,
            stacklevel=3,
        )
        config.max_length = limit
    check_max_length(None, config, str(path), limit)


def check_max_length(model: Any, config: Any, path: str | None, limit: int | None = None) -> None:
    """Refuse token lengths longer than the model's position table (an IndexError, or silent garbage, later)."""
    if limit is None:
        limit = _position_limit(getattr(model, "config", None))
    if limit is None:
        return
    for name, value in _lengths(config).items():
        if value > limit:
            raise ConfigError(
                f"{name} is {value} but the model{f' at {path!r}' if path else ''} has positions for {limit} tokens "
                f"(max_position_embeddings in its config.json); longer sequences would index past its position "
                f"table. Set it to {limit} or less"
            )


def _load_error(exc: Exception, path: str, what: str) -> PosttrainError | None:
    """A one-line error for the ways ``from_pretrained`` fails on user input, or None for anything else."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "trust_remote_code" in text or "custom code" in text:
        return PosttrainError(
            f"{what} at {path!r} needs custom code from its directory (or repository) to load. That code runs with "
            "your permissions, so posttrain does not run it by default: read it, then pass --trust_remote_code true."
        )
    if "does not recognize this architecture" in text:
        return PosttrainError(
            f"{what} at {path!r} has a model type ({_model_type(path)!r} in config.json) that this transformers "
            "version does not know; upgrade transformers (`pip install -U transformers`) or fix config.json."
        )
    if "attn_implementation" in text or "FlashAttention" in text or "flash_attn" in text:
        return PosttrainError(f"{what} at {path!r} cannot use the attention implementation asked for: {first}")
    return None


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, _DTYPES[name])


def _ensure_pad_token(tokenizer: Any, what: str, name: str, save: str) -> None:
    """Batches are padded: reuse EOS as the pad token when there is none (padding is masked out, so it is safe)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PosttrainError(
                f"{what} has neither a pad nor an EOS token; add a pad token "
                f"({name}.add_special_tokens({{'pad_token': '<pad>'}})) and {save}."
            )
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (the EOS token) when it has none.

    .. versionadded:: 0.1
    """
    from transformers import AutoTokenizer

    kwargs = _check_path(path)
    p = Path(path).expanduser()
    if p.is_dir() and not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise PosttrainError(
            f"model directory {path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the tokenizer "
            f"there too (tokenizer.save_pretrained({path!r}))."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise _load_error(exc, path, "tokenizer") or PosttrainError(
            f"cannot load the tokenizer of {path!r}: {_first_line(exc)}. Check that the directory holds the files "
            "tokenizer.save_pretrained writes."
        ) from None
    _ensure_pad_token(tokenizer, f"tokenizer at {path!r}", "tokenizer", "save it again")
    return tokenizer


def load_processor(path: str, trust_remote_code: bool = False):
    """Load a vision-language model's processor (tokenizer + image processor) with ``AutoProcessor``; its
    tokenizer gets a pad token (the EOS token) when it has none, as :func:`load_tokenizer` does.

    Raises:
        PosttrainError: the directory holds no processor (only a tokenizer).

    .. versionadded:: 1.0
    """
    from transformers import AutoProcessor

    kwargs = _check_path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise _load_error(exc, path, "processor") or PosttrainError(
            f"cannot load the processor of {path!r}: {_first_line(exc)}. Check that the directory holds the files "
            "processor.save_pretrained writes."
        ) from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise PosttrainError(
            f"model at {path!r} is a vision-language model but its directory holds no processor with an image "
            "processor (preprocessor_config.json or processor_config.json), so images cannot be turned into pixel "
            "values. Save the model's processor next to it: processor.save_pretrained(PATH)."
        )
    _ensure_pad_token(
        processor.tokenizer,
        f"the tokenizer of the processor at {path!r}",
        "processor.tokenizer",
        "save the processor again",
    )
    return processor


def load_causal_lm(path: str, config: Any, model_class: Any = None):
    """Load a model with ``from_pretrained`` and the config's dtype/attention/remote-code settings.

    A vision-language model (its config has a ``vision_config``) loads with ``AutoModelForImageTextToText``
    unless ``model_class`` says otherwise, so a reference model is the same class as the policy.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 vision-language models load with ``AutoModelForImageTextToText``.
    """
    from transformers import AutoModelForCausalLM

    from posttrain.vision import is_vision_language_model

    kwargs = _check_path(path)
    if model_class is None and is_vision_language_model(path, config.trust_remote_code):
        from transformers import AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText
    model_class = model_class or AutoModelForCausalLM
    kwargs.update(dtype=_dtype(config.dtype), trust_remote_code=config.trust_remote_code)
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError:  # a .bin weights file holding objects: refused by weights_only, never run
        raise PosttrainError(
            f"cannot load the model at {path!r}: its weights file holds Python objects other than tensors, which "
            "could run code when loaded, so it was not loaded. Use a model saved as safetensors from a source you "
            "trust."
        ) from None
    except (OSError, ImportError) as exc:
        known = _load_error(exc, path, "model")
        if known is None and not isinstance(exc, OSError):
            raise
        raise known or PosttrainError(
            f"cannot load the model at {path!r}: {_first_line(exc)}. Check that the directory holds the files "
            "save_pretrained writes (config.json and model*.safetensors)."
        ) from None
    except ValueError as exc:
        known = _load_error(exc, path, "model")
        if known is not None:
            raise known from None
        if "Unrecognized configuration class" in str(exc):
            name = getattr(model_class, "__name__", str(model_class))
            fix = (
                "Pass a causal language model (a checkpoint whose architecture ends in ForCausalLM)."
                if model_class is AutoModelForCausalLM
                else f"Pass a model that {name} supports."
            )
            raise PosttrainError(
                f"model at {path!r} cannot be loaded as {name}: {str(exc).splitlines()[0].rstrip('.')}. {fix}"
            ) from None
        raise
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_peft(model: Any, config: Any):
    """Wrap ``model`` with LoRA adapters when ``config.use_peft`` (needs the ``peft`` extra).

    In a vision-language model the parts ``config.freeze`` names get no adapter: ``freeze:
    vision_and_projector`` puts LoRA on the language model only, ``vision`` on the language model and the
    projector, ``none`` on every linear layer (TRL's ``all-linear``).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 no adapters in the parts of a vision-language model that ``freeze`` names.
    """
    if not config.use_peft:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PosttrainError(
            "use_peft is true but peft is not installed; run `pip install 'posttrain[peft]'`."
        ) from None
    # A sequence classifier (reward model) trains its new score head in full next to the adapters.
    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
        task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM",
        modules_to_save=["score"] if is_classifier else None,
        exclude_modules=_frozen_linear_modules(model, getattr(config, "freeze", "none")) or None,
    )
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def _frozen_linear_modules(model: Any, freeze: str) -> list[str]:
    """Full names of the linear layers in the parts of a vision-language model ``freeze`` names (no adapters)."""
    import torch

    from posttrain.vision import parameter_part

    if freeze == "none":
        return []
    parts = {"vision"} if freeze == "vision" else {"vision", "projector"}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and parameter_part(name) in parts
    ]


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` carries PEFT adapters (then :func:`reference_model` returns None).

    .. versionadded:: 0.1
    """
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model: Any) -> None:
    """Set the probability of every ``torch.nn.Dropout`` module in ``model`` to 0, in place.

    Preference and reward methods do this by default (TRL's ``disable_dropout_in_model``): with dropout on, the
    policy's log-probs are noisy while the reference's (in eval mode) are not, which biases the log-ratios.
    Dropout a model applies functionally from a config value (Llama's ``attention_dropout``) is not changed.

    .. versionadded:: 1.0
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(model: Any):
    """A frozen, eval-mode copy (used as reference when no path is available).

    .. versionadded:: 0.1
    """
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def reference_model(ctx: Any, path: str | None = None):
    """The reference model for KL/preference losses, or ``None`` when the policy is a PEFT model.

    By default a frozen copy is loaded from the policy's own path; with LoRA the reference is the
    base model with adapters disabled (see :func:`reference_forward`), which costs no memory.

    .. versionadded:: 0.1
    """
    from posttrain import _distributed

    if is_peft_model(ctx.model):
        return None
    path = path or ctx.model_path
    if path:
        with _distributed.loading_whole():  # every process loads it whole, then shards it below
            ref = load_causal_lm(path, ctx.config)
    else:
        ref = frozen_copy(ctx.model)
    ref.requires_grad_(False)
    ref.eval()
    if ctx.accelerator is not None:
        ref = ref.to(ctx.accelerator.device)
        if _distributed.is_sharded(ctx.accelerator):  # FSDP2: the reference costs 1/world per process
            ref = _distributed.shard_frozen(ref, ctx.accelerator)
    return ref


@contextlib.contextmanager
def reference_forward(policy: Any, ref: Any):
    """Yield the module that computes reference outputs: ``ref``, or the adapter-disabled policy.

    .. versionadded:: 0.1
    """
    import torch

    with torch.no_grad():
        if ref is not None:
            yield ref
        else:
            base = getattr(policy, "module", policy)  # unwrap DDP
            with base.disable_adapter():
                yield base


def load_teacher(path: str, tokenizer: Any, config: Any, device: Any = None):
    """Load a frozen teacher for distillation; it must share the student's tokenizer vocabulary.

    .. versionadded:: 0.1
    """
    from transformers import AutoTokenizer

    kwargs = _check_path(path, "teacher")
    teacher_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code, **kwargs)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise PosttrainError(
            f"teacher at {path!r} uses a different tokenizer vocabulary ({len(teacher_tok)} vs {len(tokenizer)} tokens); "
            "on-policy distillation here compares token distributions, so teacher and student must share a tokenizer."
        )
    from posttrain import _distributed

    with _distributed.loading_whole():  # under FSDP2 every process holds a whole (unsharded) teacher
        teacher = load_causal_lm(path, config)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device) if device is not None else teacher


@contextlib.contextmanager
def eval_mode(model: Any):
    """Run ``model`` in eval mode (no dropout noise; gradient checkpointing inactive), then restore its mode.

    Online methods score their own samples this way: the old and reference log-probs of a rollout.

    .. versionadded:: 1.0
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- padding-free batches --------------------------------------------------------------------------------------

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that run the sequences of a padding-free row as separate ones (variable-length
kernels driven by the ``position_ids`` restarts), so a packed row costs the sum of its sequences' attention.
Under ``sdpa``, ``eager`` and ``flex_attention`` transformers builds one block-diagonal mask over the whole row
instead: exact, but its attention costs the square of the packed length (docs/benchmarks.md, "Padding-free rows").

.. versionadded:: 1.0
"""


def check_packed_attention(model: Any, option: str = "packing/padding_free") -> None:
    """Fail at start-up when the model lets sequences concatenated in one row attend to each other.

    Padding-free batches rely on transformers deriving a block-diagonal causal mask from ``position_ids`` that
    restart at 0 (``masking_utils.find_packed_sequence_indices``, used by eager, sdpa, flex and flash attention when
    no attention mask and no cache are passed). A model or kernel that ignores the restarts would train on
    cross-sequence attention silently, so two short sequences are run packed and separately and compared.

    Args:
        model: a causal LM (unwrapped: its ``config`` and ``get_input_embeddings`` are read).
        option: the config option(s) that asked for packed rows, named in the error.

    Raises:
        ConfigError: the packed final hidden states differ from the separate ones.

    .. versionadded:: 1.0 (moved from posttrain-sft)
    """
    import torch

    with torch.no_grad():
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        first, second = torch.arange(1, 7, device=device) % vocab, torch.arange(7, 11, device=device) % vocab
        position_ids = torch.cat([torch.arange(6), torch.arange(4)]).to(device)[None]
        was_training = model.training
        model.eval()  # no dropout, so any difference comes from the mask
        # the final hidden states, not the logits: a sequence classifier's logits are pooled to one per row
        last = {"use_cache": False, "output_hidden_states": True}
        try:
            separate = torch.cat([model(input_ids=x[None], **last).hidden_states[-1][0] for x in (first, second)])
            separate = separate.float()
            packed = model(input_ids=torch.cat([first, second])[None], position_ids=position_ids, **last)
            packed = packed.hidden_states[-1][0].float()
        finally:
            model.train(was_training)
    error = float((packed - separate).abs().max() / separate.abs().max().clamp(min=1e-6))
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if error > tolerance:
        impl = getattr(model.config, "_attn_implementation", None)
        raise ConfigError(
            f"{option} is true, but with attn_implementation={impl!r} this model lets sequences that share "
            f"a row attend to each other (final hidden states differ from separate sequences' by {error:.2e}, "
            f"relative; allowed {tolerance:.0e}). Use attn_implementation sdpa, eager, flex_attention or flash_attention_2 with a model "
            f"whose attention mask follows position_ids restarts, or set {option.replace('/', ' and ')} false."
        )


def resolve_padding_free(model: Any, setting: bool | str) -> bool | str:
    """What a method's ``padding_free`` setting (true, false or "auto") gives for ``model``: every micro-batch
    padding-free (``True``), none (``False``), or a choice per micro-batch (``"auto"``, made by :func:`pack_batch`).

    ``True`` checks the model keeps packed sequences apart (:func:`check_packed_attention`, an error otherwise).
    ``"auto"`` runs the same check (a warning, and padded batches, when it fails); then under an attention
    implementation in :data:`VARLEN_ATTENTION` every micro-batch is padding-free (cheaper by construction), and
    under any other (sdpa, eager, flex_attention), whose packed row attends over the square of its packed length,
    :func:`pack_batch` estimates both layouts of each micro-batch and packs only where that is cheaper.

    Args:
        model: the policy (or any model that runs the micro-batch), unwrapped.
        setting: the config value.

    Returns:
        ``True``, ``False`` or ``"auto"``; pass it to :func:`pack_batch` with each micro-batch's lengths.

    .. versionadded:: 1.0
    .. versionchanged:: 1.0 ``"auto"`` under dense attention is returned as ``"auto"`` (a choice per micro-batch)
       instead of ``False``.
    """
    if setting is True:
        check_packed_attention(model, "padding_free")
        return True
    if setting != "auto":
        return False
    try:
        check_packed_attention(model, "padding_free")
    except ConfigError as exc:
        import warnings

        warnings.warn(f"padding_free is auto: keeping padded batches. {exc}", stacklevel=2)
        return False
    return True if getattr(getattr(model, "config", None), "_attn_implementation", None) in VARLEN_ATTENTION else "auto"


_ATTENTION_COST = 3.0
"""Cost of one (query, key) cell of a dense attention matrix per head dimension, in multiply-adds of a linear
layer, for :func:`pack_batch`'s estimate: its matrix products are 2 multiply-adds per cell and head dimension
(``QK^T`` and ``AV``), and the softmax and its backward add to them."""

_MASK_COST = 200
"""Cost of one cell of the attention mask per layer, whatever the number of heads (the mask is read and applied
in every layer's attention), in multiply-adds of a linear layer."""

_TOKEN_COST = 2400
"""Cost of a layer's element-wise work per token and hidden unit (norms, rotary embeddings, activation, residual
additions, forward and backward), in multiply-adds of a linear layer: memory-bound, so one element costs about as
much as thousands of multiply-adds in a matrix product. On CPU it is near the linear layers' cost at hidden size 256
and shrinks in share as the hidden size grows.

The three constants are a least-squares fit of the difference packed - padded of CPU process times of sdpa
forward + backward (``benchmarks/padding_free.py``: 48 micro-batches of six length profiles on Llama 2 x 128,
4 x 256, 4 x 384 and 4 x 512), checked on micro-batches not used by the fit (docs/benchmarks.md, "Padding-free
rows")."""

_PACK_MARGIN = 0.95
""":func:`pack_batch` packs a micro-batch under dense attention only when the packed layout's estimated body cost
is at most this share of the padded one: a near tie (within the estimate's error of a few percent) stays padded."""


def _text_config(model: Any) -> Any:
    """The language model's config of a model (DDP, compile and PEFT wrappers looked through) or of a config."""
    if not hasattr(model, "hidden_size") and not hasattr(model, "get_text_config"):
        from posttrain.ops import _unwrap

        model = _unwrap(model)
    config = getattr(model, "config", model)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _layout_costs(config: Any, lengths: list[int], width: int) -> tuple[float, float]:
    """(padded, packed) estimated cost of a forward + backward of the model's body (its transformer layers) over
    sequences of ``lengths``, padded to (len(lengths), width) or packed in one dense-attention row.

    Per token, every layer's linear maps cost their weights' size (q and o: hidden x heads x head_dim, k and v:
    hidden x kv_heads x head_dim, a gated MLP: 3 x hidden x intermediate) plus :data:`_TOKEN_COST` x hidden of
    element-wise work; per attention cell, :data:`_ATTENTION_COST` x heads x head_dim + :data:`_MASK_COST`. A
    padded batch pays both for its padding (width x width cells per row); a packed row pays no padding but attends
    over (sum of lengths)^2 cells, the blocks between sequences masked out but computed. The head (embedding and LM head) is left out: it
    runs on the same real (or scored) tokens in both layouts. Forward and backward scale alike: one pass counted.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate + _TOKEN_COST * hidden
    per_cell = _ATTENTION_COST * heads * head_dim + _MASK_COST
    n, rows = sum(lengths), len(lengths)
    padded = rows * width * per_token + rows * width * width * per_cell
    packed = n * per_token + n * n * per_cell
    return float(padded), float(packed)


def pack_batch(model: Any, padding_free: bool | str, lengths: Any, width: int | None = None) -> bool:
    """Whether to run this micro-batch padding-free, for the value :func:`resolve_padding_free` returned.

    ``True`` and ``False`` are answered as they are. ``"auto"`` (dense attention) compares estimates of the two
    layouts of this micro-batch from its lengths and the model's dimensions (:func:`_layout_costs`) and packs when
    the packed one is at most :data:`_PACK_MARGIN` of the padded one: packing removes the padding from every layer
    but makes attention cost (sum of lengths)^2 instead of rows x width^2, so it pays when lengths are far apart
    (heavy-tailed data) and not when they are close (length-grouped batches, equal-length completions). Both
    layouts give the same losses and gradients to float rounding, so only time depends on the answer. It is a pure
    function of the lengths and the model's config, so a resumed run and every process make the same choices for
    the same micro-batch, and in a multi-process run each process may choose differently for its own micro-batch
    (the layout changes no collective operation: the same modules run once each either way).

    Args:
        model: the model that runs the micro-batch (its config's dimensions are read), or its config.
        padding_free: ``True``, ``False`` or ``"auto"``, from :func:`resolve_padding_free`.
        lengths: the padded layout's (B, T) attention mask (1 on real tokens), or the real length of each
            sequence (a list of ints or a (B,) tensor).
        width: the padded layout's row width: T for a mask, the longest length for lengths, unless given. Left
            padded prompts followed by right padded completions are wider than the longest sequence.

    Returns:
        True to run the micro-batch as one padding-free row.

    .. versionadded:: 1.0
    """
    if padding_free is True:
        return True
    if padding_free != "auto":
        return False
    if getattr(lengths, "ndim", 1) == 2:  # an attention mask: its rows' real tokens, padded to its width
        width, lengths = lengths.size(1) if width is None else width, lengths.sum(-1)
    lengths = [int(n) for n in (lengths.tolist() if hasattr(lengths, "tolist") else lengths)]
    padded, packed = _layout_costs(_text_config(model), lengths, max(lengths) if width is None else int(width))
    return packed <= _PACK_MARGIN * padded
