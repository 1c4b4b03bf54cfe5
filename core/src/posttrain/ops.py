"""Numeric helpers used by three or more methods, with no method-specific choice in them.

**Log-probs without the logits.** A causal LM's head turns hidden states (B, T, H) into logits (B, T, V); with a
32k-150k vocabulary that tensor, its float32 copy and the log-softmax (each kept for backward) are most of a
step's memory, and they grow with the vocabulary. Here the head is applied by :func:`head_logps` in chunks of
tokens instead: each chunk's logits are built, reduced to what a loss needs (the label's log-prob, and on request
the entropy, whether the label is the top-1 token and the vocabulary-mean logit), and dropped; backward rebuilds
them chunk by chunk. Peak memory for the head is one chunk (:data:`LOGITS_CHUNK_ELEMENTS` floats), whatever the
vocabulary, and only the positions that carry a label reach the head at all.

:func:`hidden_states` runs a model and returns its final hidden states together with the head (an
:class:`LMHead`) in place of the logits, so a method writes::

    hidden, head = hidden_states(model, input_ids=ids, attention_mask=mask)   # (B, T, H)
    out = head_logps(hidden[:, :-1][keep], head, ids[:, 1:][keep])            # (M,) log-probs

:func:`sequence_logps`, :func:`completion_logps` and :func:`token_stats` are that pattern for the common shapes;
:func:`segment_sum` sums per-token values of flattened (padding-free) rows back into per-sequence values.

**Padding-free rows.** :func:`pack_sequences` concatenates a micro-batch's sequences into one row whose
``position_ids`` restart at 0 for each sequence; with no attention mask and no cache, transformers derives a
block-diagonal causal mask from the restarts (and flash-attention kernels run the sequences as separate ones), so
no token attends across a boundary and no padding is computed. :func:`packed_sequence_logps` is
:func:`sequence_logps` for such a row; :func:`posttrain.models.check_packed_attention` checks a model keeps packed
sequences apart. A padded batch runs as such a row with ``padding_free=True`` to :func:`hidden_states` (and so to
:func:`token_stats`, :func:`sequence_logps`, :func:`completion_logps`), its results put back in the padded layout;
:func:`posttrain.models.pack_batch` says whether a micro-batch is cheaper that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LOGITS_CHUNK_ELEMENTS",
    "LMHead",
    "TokenLogps",
    "completion_logps",
    "head_logps",
    "hidden_states",
    "pack_sequences",
    "packed_sequence_logps",
    "segment_sum",
    "sequence_logps",
    "shift_for_causal_lm",
    "token_logps",
    "token_stats",
    "unpad",
]

LOGITS_CHUNK_ELEMENTS = 1 << 23
"""Logits built at once by :func:`head_logps`: ``max(1, LOGITS_CHUNK_ELEMENTS // V)`` tokens per chunk (32 MiB of
float32 logits; 256 tokens of a 32k vocabulary, 55 of a 152k one). Larger chunks make fewer, bigger matrix
products; the head's memory is a few chunks, never B x T x V.

.. versionadded:: 1.0
"""


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


# -- the head, applied in chunks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMHead:
    """How hidden states become logits: ``softcap(scale * (hidden @ weight.T + bias))``.

    ``weight`` None means the "hidden states" are logits already (a model whose head is not a plain linear layer:
    :func:`hidden_states` then falls back to the model's own logits, and :func:`head_logps` only chunks the softmax).

    Attributes:
        weight: (V, H) or None. bias: (V,) or None.
        scale: multiplier of the logits (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``); 1 for most.
        softcap: Gemma 2's ``final_logit_softcapping`` (``cap * tanh(z / cap)``), or None.

    .. versionadded:: 1.0
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int | None:
        return None if self.weight is None else self.weight.size(0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, H) -> (M, V) float32 logits of a chunk of rows (float64 for float64 inputs; the projection runs in the
        autocast dtype, if any)."""
        z = hidden if self.weight is None else F.linear(hidden, self.weight, self.bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


@dataclass
class TokenLogps:
    """Per-token results of :func:`head_logps` (shape (M,)) or :func:`token_stats` (shape of the labels).

    Attributes:
        logps: float32 log-probability of each label (0 where the label is ignored); carries the gradient.
        entropy: float32 entropy of the predicted distribution in nats (with gradient when asked), or None.
        top1: bool, the label is the arg-max token (the first one on ties, as ``argmax``), or None.
        mean_logit: float32 mean of the V logits (a TRL metric, detached), or None.

    .. versionadded:: 1.0
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab))


def _chunk_stats(z: torch.Tensor, labels: torch.Tensor, entropy: bool, top1: bool, mean_logit: bool):
    """Reduce one chunk of float32 logits (m, V) to per-row statistics; z is left as it is."""
    safe = labels.clamp(min=0).unsqueeze(-1)  # (m, 1)
    lse = torch.logsumexp(z, dim=-1)  # (m,)
    target = z.gather(-1, safe).squeeze(-1)
    top = (z.argmax(-1) == labels) if top1 else None
    mean = z.mean(-1) if mean_logit else None
    ent = None
    if entropy:
        # out of place: z may be the caller's tensor itself (a head that returns its input, weight=None, at
        # temperature 1), which backward reads again
        log_p = z - lse.unsqueeze(-1)
        ent = -(log_p.exp() * log_p).sum(-1)
    return target - lse, lse, ent, top, mean


class _HeadLogps(torch.autograd.Function):
    """Chunked ``log_softmax(head(hidden)).gather(labels)`` whose backward recomputes each chunk's logits.

    Saved for backward: the inputs, the log-normaliser and the entropy per row (M floats each), never the logits.
    Gradient with respect to the logits z of a row (p = softmax z, y the label, g and e the incoming gradients of
    log p_y and of the entropy H): dL/dz = g (onehot(y) - p) - e p (log p + H); the head's scale, softcap and
    temperature are chained on top.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head_args, temperature, want, chunk):  # type: ignore[override]
        scale, softcap = head_args
        head = LMHead(weight, bias, scale, softcap)
        m, acc = hidden.size(0), torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 stays)
        logps = hidden.new_zeros(m, dtype=acc)
        lse = hidden.new_zeros(m, dtype=acc)
        ent = hidden.new_zeros(m, dtype=acc) if want[0] else None
        top = torch.zeros(m, dtype=torch.bool, device=hidden.device) if want[1] else None
        mean = hidden.new_zeros(m, dtype=acc) if want[2] else None
        for start in range(0, m, chunk):
            rows = slice(start, start + chunk)
            z = head.logits(hidden[rows])
            if temperature != 1.0:
                z = z / temperature
            lp, ls, e, t, mn = _chunk_stats(z, labels[rows], *want)
            logps[rows], lse[rows] = lp, ls
            if ent is not None:
                ent[rows] = e
            if top is not None:
                top[rows] = t
            if mean is not None:
                mean[rows] = mn
        valid = labels >= 0
        logps = logps.masked_fill(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if ent is not None else lse)
        ctx.head_args, ctx.temperature, ctx.chunk, ctx.has_entropy = head_args, temperature, chunk, ent is not None
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.mark_non_differentiable(*(x for x in (top, mean) if x is not None))
        ctx.set_materialize_grads(False)
        return logps, ent, top, mean

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_):  # type: ignore[override]
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        scale, softcap = ctx.head_args
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_entropy = grad_entropy if ctx.has_entropy else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_hidden else None
        grad_weight = None
        if need_weight and weight is not None:
            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        grad_bias = torch.zeros_like(bias, dtype=grad_weight.dtype) if need_bias and bias is not None else None
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        device_type, enabled, dtype = ctx.autocast
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            # rebuild the chunk exactly as the forward did (same autocast dtype for the projection); z is a fresh
            # tensor, so the steps below work in place and the chunk costs about two (m, V) buffers
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                raw = h.clone() if weight is None else F.linear(h, weight, bias)
            z = raw.to(acc)
            if scale != 1.0:
                z = z.mul_(scale)
            t = None
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = t * softcap
            if ctx.temperature != 1.0:
                z = z.div_(ctx.temperature)
            log_p = z.sub_(lse[rows].unsqueeze(-1))  # (m, V), in place
            valid = labels[rows] >= 0
            g = grad_logps[rows].to(acc) * valid if grad_logps is not None else None  # ignored rows: no gradient
            if grad_entropy is not None:
                # dH/dz = -p (log p + H)
                p = log_p.exp()
                grad_z = log_p.add_(ent[rows].unsqueeze(-1)).mul_(p).mul_(-grad_entropy[rows].to(acc).unsqueeze(-1))
                if g is not None:
                    grad_z.addcmul_(p, g.unsqueeze(-1), value=-1)
                del p
            else:
                grad_z = log_p.exp_().mul_(-g.unsqueeze(-1))  # d log p_y / dz = onehot(y) - p
            if g is not None:
                grad_z.scatter_add_(-1, labels[rows].clamp(min=0).unsqueeze(-1), g.unsqueeze(-1))
            # chain through temperature, softcap and scale back to the projection's output
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            if t is not None:
                grad_z.mul_(1 - t * t)
            if scale != 1.0:
                grad_z.mul_(scale)
            if weight is None:
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_z
                continue
            if raw.dtype == acc:
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_z @ weight.to(acc)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_z.t(), h.to(acc))
            else:  # a low-precision projection (bf16 weights or autocast): its backward in that dtype, as autograd's
                low = grad_z.to(raw.dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = low @ weight.to(raw.dtype)
                if grad_weight is not None:
                    grad_weight += low.t() @ h.to(raw.dtype)
            if grad_bias is not None:
                grad_bias.add_(grad_z.sum(0))
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def head_logps(
    hidden: torch.Tensor,
    head: LMHead,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    top1: bool = False,
    mean_logit: bool = False,
    chunk_size: int | None = None,
) -> TokenLogps:
    """Log-probability of each label under ``head(hidden) / temperature``, never holding more than a chunk of logits.

    Args:
        hidden: (M, H) hidden states, one row per scored token (select the rows first: ``hidden[mask]``).
        head: the model's head, from :func:`hidden_states`.
        labels: (M,) long; a negative label gives log-prob 0 and no gradient.
        temperature: logits are divided by it (online methods score at their sampling temperature).
        entropy: also return each row's entropy (differentiable).
        top1: also return whether the label is the arg-max token. mean_logit: also return the mean logit.
        chunk_size: rows per chunk; default ``LOGITS_CHUNK_ELEMENTS // V``.

    Returns:
        :class:`TokenLogps` of (M,) tensors.

    .. versionadded:: 1.0
    """
    vocab = head.vocab_size or hidden.size(-1)
    chunk = _chunk_rows(vocab, chunk_size)
    want = (entropy, top1, mean_logit)
    logps, ent, top, mean = _HeadLogps.apply(
        hidden, head.weight, head.bias, labels, (head.scale, head.softcap), temperature, want, chunk
    )
    return TokenLogps(logps, ent, top, mean.detach() if mean is not None else None)


# -- running a model for hidden states -------------------------------------------------------------------------


class _Capture:
    """A forward pre-hook on the output layer that, while active, keeps the hidden states and feeds the layer an
    empty slice of them, so the model returns (B, 0, V) logits and never builds the full ones.

    Installed once per head and left in place (inactive it does nothing), so ``torch.compile`` sees one hook.
    """

    def __init__(self) -> None:
        self.active = False
        self.hidden: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self.active:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])


def _head_settings(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) the architecture applies to the head's output (the same attributes TRL reads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    if scale is None and getattr(text, "logits_scaling", None) is not None:  # Granite divides by it
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return float(1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP / ``torch.compile`` / PEFT wrappers (for its head and config)."""
    for _ in range(4):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def _output_layer(model: Any) -> torch.nn.Linear | None:
    base = _unwrap(model)
    get = getattr(base, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    # exactly nn.Linear: quantised and adapter-wrapped heads (subclasses, LoRA layers) keep the model's own path
    return layer if type(layer) is torch.nn.Linear else None


def _fsdp_sharded(model: Any) -> bool:
    """True when FSDP2 manages any part of ``model`` (its parameters are DTensors outside their modules' forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def hidden_states(model: Any, *, padding_free: bool = False, **inputs: Any) -> tuple[torch.Tensor, LMHead]:
    """Run ``model(**inputs, use_cache=False)`` and return its final hidden states and head instead of the logits.

    With ``padding_free`` a padded batch runs as one padding-free row (:func:`unpad`): the real tokens of every row
    concatenated, ``position_ids`` restarting at each row's first real token (any given ones are replaced), no
    attention mask; the hidden states come back in the padded layout, 0 at padding, equal to the padded forward's
    up to float rounding on the real tokens.

    The model runs through its own ``forward`` (DDP, FSDP, PEFT and ``torch.compile`` wrappers included); a hook on
    its output layer keeps the layer's input and hands it an empty slice, so no (B, T, V) tensor is built. A model
    whose output layer is not a plain ``nn.Linear`` (quantised, adapter-wrapped, no ``get_output_embeddings``) or is
    sharded by FSDP2 runs normally and its logits come back as the "hidden states" with ``LMHead(weight=None)``, so callers need no
    second path.

    Args:
        model: a causal LM, possibly wrapped.
        padding_free: run the batch as one padding-free row (needs ``input_ids`` and ``attention_mask``; besides
            them only ``position_ids`` and ``logits_to_keep``: images and the like keep the padded forward). The
            model must keep packed sequences apart (:func:`posttrain.models.check_packed_attention`).
        **inputs: model inputs (``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep`` ...).

    Returns:
        ``(hidden, head)``: hidden (B, T', H) for the positions the model would have scored (T' = T, or
        ``logits_to_keep``), and the :class:`LMHead` to apply to them.

    Raises:
        ValueError: ``padding_free`` with another per-token input.

    .. versionadded:: 1.0
    .. versionchanged:: 1.0 ``padding_free``.
    """
    if padding_free:
        return _hidden_states_unpadded(model, **inputs)
    layer = _output_layer(model)
    # FSDP2 shards the head (DTensor weight): only the module's own forward sees the gathered weight and hands its
    # gradient to FSDP's reduce-scatter; a weight gathered here would get this process's gradient alone. The head
    # then runs whole, as for a head that is not a plain Linear.
    if layer is None or _fsdp_sharded(model):
        return model(**inputs, use_cache=False).logits, LMHead()
    capture = getattr(layer, "_posttrain_capture", None)
    if capture is None:
        capture = _Capture()
        layer.register_forward_pre_hook(capture)
        layer._posttrain_capture = capture
    capture.active, capture.hidden = True, None
    try:
        model(**inputs, use_cache=False)
        hidden = capture.hidden
    finally:
        capture.active, capture.hidden = False, None
    if hidden is None:  # the forward never reached the output layer through its hook
        raise RuntimeError(f"{type(_unwrap(model)).__name__} did not call its output layer; cannot score tokens")
    weight, bias = layer.weight, layer.bias
    scale, softcap = _head_settings(_unwrap(model).config)
    return hidden, LMHead(weight, bias, scale, softcap)


def token_stats(
    model: Any,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    top1: bool = False,
    mean_logit: bool = False,
    chunk_size: int | None = None,
    padding_free: bool = False,
    **inputs: Any,
) -> TokenLogps:
    """Per-position log-probs of ``labels`` (already aligned: position t predicts ``labels[:, t]``), chunked.

    Only positions whose label is >= 0 reach the head (a prompt, padding and the last position cost nothing there).
    With ``padding_free`` a padded batch runs as one padding-free row (:func:`unpad`): the real tokens of every row
    concatenated, ``position_ids`` restarting at each row's first real token, no attention mask; the results come
    back in the padded layout, equal to the padded forward's up to float rounding.

    Args:
        model: a causal LM.
        labels: (B, T') long, -100 where nothing is scored; T' is the number of positions the model returns (T, or
            ``logits_to_keep`` when given in ``inputs``).
        temperature: as in :func:`head_logps`.
        entropy: as in :func:`head_logps`.
        top1: as in :func:`head_logps`.
        mean_logit: as in :func:`head_logps`.
        chunk_size: as in :func:`head_logps`.
        padding_free: run the batch as one padding-free row (needs ``input_ids`` and ``attention_mask``, and no other
            per-token inputs: images and the like keep the padded forward). The model must keep packed sequences
            apart (:func:`posttrain.models.check_packed_attention`).
        **inputs: model inputs.

    Returns:
        :class:`TokenLogps` of (B, T') tensors, 0 (False) at ignored positions.

    .. versionadded:: 1.0
    .. versionchanged:: 1.0 ``padding_free``.
    """
    hidden, head = hidden_states(model, padding_free=padding_free, **inputs)  # (B, T', H), 0 at padding if free
    valid = labels >= 0  # (B, T')
    rows = head_logps(
        hidden[valid],
        head,
        labels[valid],
        temperature=temperature,
        entropy=entropy,
        top1=top1,
        mean_logit=mean_logit,
        chunk_size=chunk_size,
    )

    def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        # masked_scatter keeps the graph connected even when no label is valid (a zero loss still back-propagates)
        return torch.zeros(valid.shape, dtype=values.dtype, device=values.device).masked_scatter(valid, values)

    return TokenLogps(scatter(rows.logps), scatter(rows.entropy), scatter(rows.top1), scatter(rows.mean_logit))


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One padding-free row of a padded batch: the real tokens of each row, in order, as in :func:`pack_sequences`.

    Works for left and right padding alike: each row's ``position_ids`` count its real tokens from 0. Values of a
    (B, T) tensor ``x`` come along with ``x[attention_mask.bool()]``, and go back with
    ``zeros(B, T).masked_scatter(attention_mask.bool(), packed)``.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 on real tokens; every row has at least one.

    Returns:
        ``input_ids``, ``position_ids`` and ``sequence_ids``, each (1, N) with N the number of real tokens.

    .. versionadded:: 1.0
    """
    keep = attention_mask.bool()
    positions = attention_mask.long().cumsum(-1) - 1  # (B, T): 0 at each row's first real token
    rows = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(input_ids)
    return {"input_ids": input_ids[keep][None], "position_ids": positions[keep][None], "sequence_ids": rows[keep][None]}


def _hidden_states_unpadded(model: Any, **inputs: Any) -> tuple[torch.Tensor, LMHead]:
    """:func:`hidden_states` of a padded batch run as one padding-free row, put back in the (B, T', H) layout."""
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    inputs.pop("position_ids", None)  # replaced by positions that restart at each row's first real token
    keep_last = inputs.pop("logits_to_keep", None)
    if inputs:
        raise ValueError(
            f"padding_free takes input_ids and attention_mask only, got also {sorted(inputs)}; per-token inputs such "
            "as images need the padded forward"
        )
    keep = attention_mask.bool()  # (B, T)
    row = unpad(input_ids, attention_mask)
    hidden, head = hidden_states(model, input_ids=row["input_ids"], position_ids=row["position_ids"])  # (1, N, H)
    real = keep[..., None].expand(*keep.shape, hidden.size(-1))  # (B, T, H)
    # masked_scatter keeps the graph connected: each real token's hidden state goes back to its padded position
    full = torch.zeros(real.shape, dtype=hidden.dtype, device=hidden.device).masked_scatter(real, hidden[0])
    return (full if keep_last is None else full[:, keep.size(1) - keep_last :]), head


def segment_sum(values: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum per-token values into per-sequence values: ``out[s] = sum of values[i] with segments[i] == s``.

    The inverse of flattening rows into one padding-free row: per-token log-probs of the flat row, with the
    sequence index of each token, give each sequence's summed log-prob. Differentiable in ``values``.

    Args:
        values: (N,) float. segments: (N,) long in [0, n_segments). n_segments: S.

    Returns:
        (S,) tensor of ``values``' dtype.

    .. versionadded:: 1.0
    """
    return values.new_zeros(n_segments).index_add(0, segments, values)


def pack_sequences(sequences: Sequence[Sequence[int]], **per_token: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Concatenate token sequences into one padding-free row, ``position_ids`` restarting at 0 for each.

    Args:
        sequences: S lists of token ids, none empty.
        **per_token: more per-token lists aligned with ``sequences`` (a loss mask, labels ...), packed the same way.

    Returns:
        ``input_ids``, ``position_ids`` and ``sequence_ids`` (the index of each token's sequence), each (1, N) long
        with N the total length; ``sequence_lengths`` (S,) long; and each ``per_token`` name as a (1, N) long tensor.
        Per-sequence results come back with :func:`segment_sum` over ``sequence_ids[0]``; sequence s ends at token
        ``sequence_lengths[: s + 1].sum() - 1``.

    Raises:
        ValueError: a sequence is empty, or a ``per_token`` list's length differs from its sequence's.

    .. versionadded:: 1.0
    """
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        empty = lengths.index(0) if lengths else None
        raise ValueError(f"pack_sequences needs non-empty sequences; sequence {empty} of {len(lengths)} is empty")
    for name, values in per_token.items():
        bad = [i for i, (v, n) in enumerate(zip(values, lengths)) if len(v) != n]
        if bad or len(values) != len(lengths):
            i = bad[0] if bad else min(len(values), len(lengths))
            raise ValueError(f"pack_sequences: {name} of sequence {i} does not have one value per token")
    counts = torch.tensor(lengths, dtype=torch.long)  # (S,)
    packed = {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None],  # (1, N)
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],  # (1, N), 0 at each sequence start
        "sequence_ids": torch.repeat_interleave(torch.arange(len(lengths)), counts)[None],  # (1, N)
        "sequence_lengths": counts,
    }
    for name, values in per_token.items():
        packed[name] = torch.tensor([v for row in values for v in row], dtype=torch.long)[None]  # (1, N)
    return packed


def packed_sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sequence_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    n_sequences: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` for one padding-free row (:func:`pack_sequences`): per-sequence sums and counts.

    A token is scored when its ``loss_mask`` is 1 and it is not the first token of its sequence (nothing in the
    sequence predicts it; the previous token belongs to another sequence).

    Args:
        model: a causal LM (called with ``position_ids``, no attention mask and ``use_cache=False``, so the
            position restarts keep sequences apart).
        input_ids: (1, N) token ids, from :func:`pack_sequences`.
        position_ids: (1, N), restarting at 0 for each sequence.
        sequence_ids: (1, N), the index of each token's sequence.
        loss_mask: (1, N), 1 on the tokens scored.
        n_sequences: S (``len(sequence_lengths)``: a shape, so no device synchronisation).
        **kwargs: more model inputs.

    Returns:
        ``(logps, n_tokens, mean_logits)``, each (S,), as :func:`sequence_logps` returns them.

    .. versionadded:: 1.0
    """
    # position t predicts token t+1, unless t+1 starts the next sequence
    scored = loss_mask[:, 1:].bool() & (position_ids[:, 1:] != 0)
    labels = F.pad(input_ids[:, 1:].masked_fill(~scored, -100), (0, 1), value=-100)  # (1, N)
    out = token_stats(model, labels, mean_logit=True, input_ids=input_ids, position_ids=position_ids, **kwargs)
    segments = sequence_ids[0]
    n = segment_sum((labels[0] >= 0).long(), segments, n_sequences)  # (S,)
    logps = segment_sum(out.logps[0], segments, n_sequences)
    return logps, n, segment_sum(out.mean_logit[0], segments, n_sequences) / n.clamp(min=1)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    padding_free: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the ``loss_mask`` tokens of each row, and their count.

    Args:
        model: a causal LM (called with ``use_cache=False`` and ``kwargs``, e.g. a vision-language model's pixel
            values).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 on real tokens.
        loss_mask: (B, T), 1 on the tokens scored (real tokens only).
        padding_free: run the rows as one padding-free row (:func:`token_stats`); no ``kwargs`` then.
        **kwargs: more model inputs.

    Returns:
        ``(logps, n_tokens, mean_logits)``, each (B,): summed log-probs, scored-token counts, and the mean
        logit over the scored tokens (a TRL metric).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 the head is applied in chunks to the scored positions only (:func:`head_logps`);
       ``padding_free``.
    """
    labels = F.pad(input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), -100), (0, 1), value=-100)  # (B, T)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
    out = token_stats(model, labels, mean_logit=True, padding_free=padding_free, **inputs)
    n = (labels >= 0).sum(-1)
    return out.logps.sum(-1), n, out.mean_logit.sum(-1) / n.clamp(min=1)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    completion_mask: torch.Tensor | None = None,
    padding_free: bool = False,
    **model_inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the last ``completion_width`` tokens of each row, at a sampling temperature.

    Args:
        model: a causal LM (called with ``logits_to_keep`` so only completion positions reach the head).
        input_ids: (N, P + C), a left-padded prompt followed by the right-padded completion.
        attention_mask: (N, P + C), 1 on real tokens.
        completion_width: C.
        temperature: logits are divided by it, as when the completions were sampled.
        with_entropy: also return the per-token entropy (detached).
        completion_mask: (N, C), 1 on completion tokens; the others (padding after EOS) are not scored and come back
            as 0. Default: every position is scored.
        padding_free: run the rows as one padding-free row (:func:`token_stats`): no left padding of prompts, no
            padding after short completions, same results up to float rounding on the real tokens (a padded
            position's log-prob comes back as 0). Ignored with ``model_inputs`` (images keep the padded forward).
        model_inputs: more forward inputs, e.g. a vision-language model's pixel values
            (:attr:`posttrain.generation.Rollout.model_inputs`).

    Returns:
        (logps (N, C) float32, entropy (N, C) or None).

    .. versionadded:: 1.0
    .. versionchanged:: 1.0 ``padding_free``.
    """
    if model_inputs:
        # a vision-language model numbers positions itself: Qwen2-VL's 3-D rotary positions follow the image grid,
        # which 1-D positions would flatten; rotary positions are relative, so left padding changes nothing else
        position_ids = None
    else:  # positions count real tokens only, as generate() numbers them after left padding
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = input_ids[:, -completion_width:]  # (N, C)
    if completion_mask is not None:
        labels = labels.masked_fill(~completion_mask.bool(), -100)
    labels = F.pad(labels, (0, 1), value=-100)  # (N, C + 1): the last kept position predicts nothing
    out = token_stats(
        model,
        labels,
        temperature=temperature,
        entropy=with_entropy,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_width + 1,
        padding_free=padding_free and not model_inputs,
        **model_inputs,
    )
    entropy = out.entropy[:, :-1].detach() if out.entropy is not None else None
    return out.logps[:, :-1], entropy
