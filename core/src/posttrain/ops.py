"""Numeric helpers used by three or more methods, with no method-specific choice in them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["completion_logps", "sequence_logps", "shift_for_causal_lm", "token_logps"]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``logits``.

    Args:
        logits: (B, T, V) float tensor (already aligned: position t predicts ``labels[:, t]``).
        labels: (B, T) long tensor; negative values (ignored positions) give 0.

    Returns:
        (B, T) float32 tensor of log-probs, 0 where ``labels < 0``.

    .. versionadded:: 0.1
    """
    safe = labels.clamp(min=0)
    # log_softmax in float32: bf16 loses too much precision over large vocabularies
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(labels < 0, 0.0)


def shift_for_causal_lm(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Align next-token predictions: returns (logits[:, :-1], labels[:, 1:] with -100 where masked).

    .. versionadded:: 0.1
    """
    labels = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), -100)
    return logits[:, :-1], labels


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the ``loss_mask`` tokens of each row, and their count.

    Args:
        model: a causal LM (called with ``use_cache=False`` and ``kwargs``, e.g. a vision-language model's pixel
            values).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 on real tokens.
        loss_mask: (B, T), 1 on the tokens scored.

    Returns:
        ``(logps, n_tokens, mean_logits)``, each (B,): summed log-probs, scored-token counts, and the mean
        logit over the scored tokens (a TRL metric).

    .. versionadded:: 0.1
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits, labels = shift_for_causal_lm(out.logits, input_ids, loss_mask)
    per_token = token_logps(logits, labels)
    valid = labels >= 0
    n = valid.sum(-1)
    mean_logits = (logits.detach().float().mean(-1) * valid).sum(-1) / n.clamp(min=1)
    return per_token.sum(-1), n, mean_logits


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    **model_inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the last ``completion_width`` tokens of each row, at a sampling temperature.

    Args:
        model: a causal LM (called with ``logits_to_keep`` so only completion positions reach the LM head).
        input_ids: (N, P + C), a left-padded prompt followed by the right-padded completion.
        attention_mask: (N, P + C), 1 on real tokens.
        completion_width: C.
        temperature: logits are divided by it, as when the completions were sampled.
        with_entropy: also return the per-token entropy (detached).
        model_inputs: more forward inputs, e.g. a vision-language model's pixel values
            (:attr:`posttrain.generation.Rollout.model_inputs`).

    Returns:
        (logps (N, C) float32, entropy (N, C) or None).

    .. versionadded:: 1.0
    .. versionchanged:: 1.1 ``model_inputs``.
    """
    if model_inputs:
        # a vision-language model numbers positions itself: Qwen2-VL's 3-D rotary positions follow the image grid,
        # which 1-D positions would flatten; rotary positions are relative, so left padding changes nothing else
        position_ids = None
    else:  # positions count real tokens only, as generate() numbers them after left padding
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=completion_width + 1,
        **model_inputs,
    ).logits[:, :-1]  # (N, C, V)
    logits = logits.float() / temperature
    logps = token_logps(logits, input_ids[:, -completion_width:])
    entropy = None
    if with_entropy:
        with torch.no_grad():
            log_p = torch.log_softmax(logits.detach(), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
    return logps, entropy
