"""Model, tokenizer, LoRA, reference-model and teacher-model helpers (transformers + peft)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError, PosttrainError

__all__ = [
    "apply_peft",
    "disable_dropout",
    "eval_mode",
    "frozen_copy",
    "is_peft_model",
    "load_causal_lm",
    "load_processor",
    "load_teacher",
    "load_tokenizer",
    "reference_forward",
    "reference_model",
]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _check_path(path: str, what: str = "model") -> None:
    if not path:
        raise ConfigError(f"no {what} given; pass --{what} PATH (a local directory saved with save_pretrained)")
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") > 1
    if looks_local and not p.exists():
        raise PosttrainError(f"{what} path {path!r} does not exist; pass a directory saved with save_pretrained.")
    if p.exists() and not (p / "config.json").is_file():
        raise PosttrainError(
            f"{what} path {path!r} has no config.json, so it is not a transformers model directory; "
            "point at the directory that save_pretrained wrote."
        )


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, _DTYPES[name])


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (the EOS token) when it has none.

    .. versionadded:: 0.1
    """
    from transformers import AutoTokenizer

    _check_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PosttrainError(
                f"tokenizer at {path!r} has neither a pad nor an EOS token; add a pad token "
                "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it again."
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so reusing EOS is safe
    return tokenizer


def load_processor(path: str, trust_remote_code: bool = False):
    """Load a vision-language model's processor (tokenizer + image processor) with ``AutoProcessor``; its
    tokenizer gets a pad token (the EOS token) when it has none, as :func:`load_tokenizer` does.

    Raises:
        PosttrainError: the directory holds no processor (only a tokenizer).

    .. versionadded:: 1.0
    """
    from transformers import AutoProcessor

    _check_path(path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise PosttrainError(
            f"model at {path!r} is a vision-language model but its directory holds no processor with an image "
            "processor (preprocessor_config.json or processor_config.json), so images cannot be turned into pixel "
            "values. Save the model's processor next to it: processor.save_pretrained(PATH)."
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PosttrainError(
                f"the tokenizer of the processor at {path!r} has neither a pad nor an EOS token; add a pad token "
                "(processor.tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save the processor again."
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so reusing EOS is safe
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

    _check_path(path)
    if model_class is None and is_vision_language_model(path, config.trust_remote_code):
        from transformers import AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText
    model_class = model_class or AutoModelForCausalLM
    kwargs = {"dtype": _dtype(config.dtype), "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except ValueError as exc:
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
    if is_peft_model(ctx.model):
        return None
    path = path or ctx.model_path
    if path:
        ref = load_causal_lm(path, ctx.config)
    else:
        ref = frozen_copy(ctx.model)
    ref.requires_grad_(False)
    ref.eval()
    if ctx.accelerator is not None:
        ref = ref.to(ctx.accelerator.device)
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

    _check_path(path, "teacher")
    teacher_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise PosttrainError(
            f"teacher at {path!r} uses a different tokenizer vocabulary ({len(teacher_tok)} vs {len(tokenizer)} tokens); "
            "on-policy distillation here compares token distributions, so teacher and student must share a tokenizer."
        )
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
