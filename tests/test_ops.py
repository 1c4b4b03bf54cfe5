"""The chunked LM-head log-probs of ``posttrain.ops`` against the plain full-logits path, and their memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from posttrain import ops
from torch.utils._python_dispatch import TorchDispatchMode


def _plain(hidden, weight, bias, labels, scale=1.0, softcap=None, temperature=1.0):
    """The reference: full (M, V) logits, float32 log_softmax, gather (what the methods did before chunking)."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = F.log_softmax(z, -1)
    logps = log_p.gather(-1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(labels < 0, 0.0)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logps, entropy, z.argmax(-1) == labels, z.mean(-1)


def _inputs(dtype, m=37, h=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, v, (m,), generator=g)
    labels[[0, 5, 6]] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64])
@pytest.mark.parametrize(
    "head_args", [{}, {"scale": 0.5}, {"softcap": 3.0}, {"temperature": 0.7}], ids=["plain", "scale", "softcap", "temp"]
)
def test_head_logps_matches_full_logits_in_float64(chunk_size, head_args):
    """Values and gradients (through the label log-probs and the entropy) equal the full-logits path. float64, so
    the only difference is summation order: 1e-10."""
    hidden, weight, bias, labels = _inputs(torch.float64)
    temperature = head_args.pop("temperature", 1.0)
    head = ops.LMHead(weight, bias, **head_args)
    out = ops.head_logps(
        hidden, head, labels, temperature=temperature, entropy=True, top1=True, mean_logit=True, chunk_size=chunk_size
    )
    ref = _plain(hidden, weight, bias, labels, temperature=temperature, **head_args)
    valid = labels >= 0
    torch.testing.assert_close(out.logps, ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref[1], rtol=0, atol=1e-10)
    assert torch.equal(out.top1[valid], ref[2][valid])
    torch.testing.assert_close(out.mean_logit, ref[3], rtol=0, atol=1e-10)
    # an arbitrary weighting of both outputs, so every term of the backward formula is exercised
    w1 = torch.linspace(-1, 2, len(labels), dtype=torch.float64)
    w2 = torch.linspace(0.5, -0.3, len(labels), dtype=torch.float64)
    loss = (out.logps * w1).sum() + (out.entropy * w2).sum()
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_loss = (ref[0] * w1).sum() + (ref[1] * w2).sum()
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_head_logps_passes_gradcheck():
    hidden, weight, bias, labels = _inputs(torch.float64, m=8, h=3, v=7)

    def head_fn(h, w, b):
        out = ops.head_logps(h, ops.LMHead(w, b, 0.7, 2.0), labels, temperature=1.3, entropy=True, chunk_size=3)
        return out.logps, out.entropy

    assert torch.autograd.gradcheck(head_fn, (hidden, weight, bias))


def test_head_logps_float32_and_bfloat16_match_within_dtype_tolerance():
    """float32: both paths reduce in float32, 1e-5 relative. bfloat16 weights: the projection runs in bfloat16 in
    both paths (then float32), so they agree to bfloat16's resolution of the logits (2^-8 relative, ~0.05 here)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        hidden, weight, bias, labels = _inputs(dtype, m=40, h=16, v=300)
        out = ops.head_logps(hidden, ops.LMHead(weight, bias), labels, chunk_size=7)
        ref = _plain(hidden, weight, bias, labels)[0]
        torch.testing.assert_close(out.logps, ref, rtol=tol, atol=tol)
        g = torch.autograd.grad(out.logps.sum(), (hidden, weight))
        g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
        for got, want in zip(g, g_ref):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


def test_no_valid_label_gives_zero_and_a_connected_graph(tiny_model):
    model, _ = tiny_model
    ids = torch.tensor([[3, 4, 5]])
    out = ops.token_stats(model, torch.full((1, 3), -100), input_ids=ids)
    assert torch.equal(out.logps, torch.zeros(1, 3))
    out.logps.sum().backward()  # a zero loss still back-propagates (no "does not require grad" error)


@pytest.fixture
def tiny_model(tmp_path):
    from posttrain.testing import build_tiny_model
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "m", seed=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, model.config.vocab_size


def test_model_paths_match_full_logits(tiny_model):
    """``sequence_logps`` and ``completion_logps`` on a real model: values and every parameter's gradient equal the
    full-logits path to float32 reduction-order tolerance."""
    model, vocab = tiny_model
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 5:] = 1

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logps, n, _ = ops.sequence_logps(model, ids, mask, loss_mask)
    got = grads(logps.sum())
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    plain, labels = ops.shift_for_causal_lm(logits, ids, loss_mask)
    ref = ops.token_logps(plain, labels).sum(-1)
    want = grads(ref.sum())
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    assert n.tolist() == [4, 4, 4]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    c_logps, entropy = ops.completion_logps(model, ids, mask, 4, temperature=0.8, with_entropy=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -5:-1] / 0.8
    torch.testing.assert_close(c_logps, ops.token_logps(logits, ids[:, -4:]), rtol=1e-5, atol=1e-5)
    log_p = logits.float().log_softmax(-1)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (forward and backward), in elements."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_vocabulary_logits_with_a_32k_vocabulary(tmp_path, monkeypatch):
    """With a 32k vocabulary, no tensor of the forward and backward is anywhere near B x T x V: the head's largest
    tensor is one chunk (or the (V, H) weight and its gradient). The plain path, measured the same way, does build
    B x T x V elements, so the bound is not vacuous."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    b, t, v = 4, 64, config.vocab_size
    ids = torch.randint(0, v, (b, t))
    mask, loss_mask = torch.ones_like(ids), torch.ones_like(ids)
    monkeypatch.setattr(ops, "LOGITS_CHUNK_ELEMENTS", 8 * v)  # 8 tokens per chunk: 256k elements
    with _LargestTensor() as chunked:
        ops.sequence_logps(model, ids, mask, loss_mask)[0].sum().backward()
    full = b * t * v  # 8.2M
    assert chunked.largest <= max(8 * v, v * config.hidden_size), chunked.largest
    assert chunked.largest < full / 8
    with _LargestTensor() as plain:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ops.token_logps(logits[:, :-1], ids[:, 1:]).sum().backward()
    assert plain.largest >= b * (t - 1) * v


@pytest.mark.slow
def test_hidden_states_through_a_compiled_model(tiny_model, monkeypatch):
    """``torch_compile: true`` calls ``model.compile()``: the head's capture hook runs inside the compiled forward,
    the chunked log-probs and gradients equal the eager ones (inductor may reorder float32 sums: 1e-5), and a plain
    call afterwards (as generation makes) still returns full logits."""
    model, vocab = tiny_model
    ids = torch.randint(5, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run():
        logps = ops.sequence_logps(model, ids, mask, mask)[0]
        logps.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return logps.detach(), grads

    eager, eager_grads = run()
    # inductor imports setuptools, whose distutils shim refuses to load when another test of this worker already
    # imported the standard library's distutils; keep the standard one (nothing here builds packages)
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    model.compile()
    compiled, compiled_grads = run()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert model(input_ids=ids, use_cache=False).logits.shape == (2, 12, vocab)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_head_that_returns_its_input_keeps_exact_gradients_with_entropy(temperature):
    """``LMHead()`` (no weight: the "hidden states" are already logits, the path of quantised or FSDP2-sharded
    heads) hands the chunk its own input; computing the entropy must not overwrite it, since backward reads it
    again (it once did, at temperature 1, and GRPO's gradients moved by 0.8%)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 7, 10, 2])
    weights = torch.randn(6, dtype=torch.float64)
    out = ops.head_logps(logits, ops.LMHead(), labels, temperature=temperature, entropy=True)
    (out.logps * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits / temperature, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    (reference * (labels >= 0) * weights).sum().backward()
    torch.testing.assert_close(got, logits.grad, rtol=0, atol=1e-12)  # float64: the same operations up to rounding


# -- padding-free rows -----------------------------------------------------------------------------------------


def test_pack_sequences_restarts_positions_and_indexes_sequences():
    packed = ops.pack_sequences([[5, 6, 7], [8], [9, 10]], loss_mask=[[0, 1, 1], [1], [0, 1]])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed["sequence_ids"].tolist() == [[0, 0, 0, 1, 2, 2]]
    assert packed["sequence_lengths"].tolist() == [3, 1, 2]
    assert packed["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 1]]
    with pytest.raises(ValueError, match="sequence 1 of 2 is empty"):
        ops.pack_sequences([[1], []])
    with pytest.raises(ValueError, match="loss_mask of sequence 1"):
        ops.pack_sequences([[1], [2, 3]], loss_mask=[[1], [1]])


def test_unpad_keeps_real_tokens_of_left_and_right_padding():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    row = ops.unpad(ids, mask)
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert row["sequence_ids"].tolist() == [[0, 0, 1, 1, 1]]


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_grads_close(got, want, scale):
    # each gradient entry is a sum over the batch's scored tokens of products out of the same forward; the two
    # layouts add them in another order and run attention over other (masked) widths, so they agree to float32
    # rounding of that sum: LOGPROB_ROUNDINGS per token, magnitude the summed log-probs plus ~1 per token
    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    for a, b in zip(got, want):
        bound = rounding_tolerance(scale * (1.0 + float(b.abs().max())), LOGPROB_ROUNDINGS)
        assert float((a - b).abs().max()) <= bound, (float((a - b).abs().max()), bound)


def test_padding_free_sequence_logps_equal_the_padded_ones(tiny_model):
    """``sequence_logps(padding_free=True)`` and ``packed_sequence_logps`` of pack_sequences' row equal the padded
    batch's values and every parameter's gradient to float32 rounding; counts exactly."""
    model, vocab = tiny_model
    model.eval()
    g = torch.Generator().manual_seed(0)
    lengths = [9, 4, 6]
    seqs = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]
    masks = [[0] * 2 + [1] * (n - 2) for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)], attention[i, : len(s)], loss_mask[i, : len(s)] = torch.tensor(s), 1, torch.tensor(m)

    logps, n, mean = ops.sequence_logps(model, ids, attention, loss_mask)
    want = _grads(model, logps.sum())
    free, n_free, mean_free = ops.sequence_logps(model, ids, attention, loss_mask, padding_free=True)
    got_free = _grads(model, free.sum())
    packed = ops.pack_sequences(seqs, loss_mask=masks)
    args = (packed["input_ids"], packed["position_ids"], packed["sequence_ids"], packed["loss_mask"], 3)
    pl, pn, pmean = ops.packed_sequence_logps(model, *args)
    got_packed = _grads(model, pl.sum())

    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    # per sequence: a sum of <= 7 log-probs, each out of a forward pass (see _assert_grads_close)
    bound = rounding_tolerance(float(logps.detach().abs().max()) + 7, LOGPROB_ROUNDINGS + 7)
    for values, counts, means in ((free, n_free, mean_free), (pl, pn, pmean)):
        assert counts.tolist() == n.tolist() == [n - 2 for n in lengths]
        assert float((values - logps).abs().max()) <= bound
        assert float((means - mean).abs().max()) <= bound
    _assert_grads_close(got_free, want, float(logps.detach().abs().sum()) + sum(lengths))
    _assert_grads_close(got_packed, want, float(logps.detach().abs().sum()) + sum(lengths))
    # a bug that lets sequences see each other moves the values by more than the bound, even on this near-uniform
    # random model (measured 24x the bound)
    leaky = ops.sequence_logps(model, packed["input_ids"], torch.ones_like(packed["input_ids"]), packed["loss_mask"])
    assert float((leaky[0].sum() - logps.sum()).abs()) > 10 * bound


def test_padding_free_auto_chooses_per_batch_and_either_choice_equals_the_padded_batch(tiny_model):
    """``padding_free: "auto"`` under sdpa: pack_batch packs a batch of one long and three short rows and keeps a
    batch of near-equal rows padded (on this model's dimensions); the forward gets one row exactly when it packs, and
    either way the summed log-probs and every parameter's gradient equal the padded batch's to float32 rounding."""
    from posttrain.models import pack_batch
    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    model, vocab = tiny_model
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows_seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].size(0)))
    for lengths, packs in (([3, 40, 4, 3], True), ([10, 9, 10, 8], False)):
        ids = torch.zeros(4, max(lengths), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, :n], attention[i, :n] = torch.randint(5, vocab, (n,), generator=g), 1
        loss_mask = attention.clone()
        loss_mask[:, :2] = 0  # a two-token prompt
        free = pack_batch(model, "auto", attention)
        assert free is packs, (lengths, free)
        logps = ops.sequence_logps(model, ids, attention, loss_mask)[0]
        want = _grads(model, logps.sum())
        rows_seen.clear()
        auto = ops.sequence_logps(model, ids, attention, loss_mask, padding_free=free)[0]
        got = _grads(model, auto.sum())
        assert rows_seen == ([1] if packs else [4])
        bound = rounding_tolerance(float(logps.detach().abs().max()) + max(lengths), LOGPROB_ROUNDINGS + max(lengths))
        assert float((auto - logps).detach().abs().max()) <= bound
        _assert_grads_close(got, want, float(logps.detach().abs().sum()) + sum(lengths))


def test_padding_free_completion_logps_equal_the_padded_ones(tiny_model):
    """Left-padded prompts and right-padded completions: the completion log-probs and entropies of the real tokens
    equal the padded forward's; padded completion positions come back as 0."""
    model, vocab = tiny_model
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of a short prompt
    mask[1, -2:] = 0  # a completion that ended early
    completion_mask = mask[:, -4:]
    logps, entropy = ops.completion_logps(model, ids, mask, 4, 0.8, True, completion_mask)
    want = _grads(model, logps.sum())
    free, free_entropy = ops.completion_logps(model, ids, mask, 4, 0.8, True, completion_mask, padding_free=True)
    got = _grads(model, free.sum())
    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    bound = rounding_tolerance(float(logps.detach().abs().max()) + 1, LOGPROB_ROUNDINGS)
    assert float((free - logps).abs().max()) <= bound
    scored = completion_mask.bool()
    assert float((free_entropy - entropy)[scored].abs().max()) <= bound
    assert (free[~scored] == 0).all()
    _assert_grads_close(got, want, float(logps.detach().abs().sum()) + 12)


def test_token_stats_padding_free_refuses_other_per_token_inputs(tiny_model):
    model, _ = tiny_model
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="pixel_values"):
        ops.token_stats(model, ids, padding_free=True, input_ids=ids, attention_mask=mask, pixel_values=ids)
