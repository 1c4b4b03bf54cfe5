"""The model side of DPO: one concatenated forward, and the three ways to get reference log-probs.

Checked on the tiny Llama (CPU, fp32):
- the [chosen; rejected] forward equals two separate forwards with their own padding;
- precomputed reference log-probs give the same loss as a live reference model, after the policy moved;
- under LoRA the reference is the adapter-disabled base; reference_free uses log pi_ref = 0.
"""

import math

import datasets
import pytest
import torch
from posttrain.models import load_causal_lm
from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance
from posttrain_dpo import DPO
from posttrain_dpo.method import completion_logps


def _logps_tolerance(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per sequence: how far two groupings of the same forward pass (batched and padded, or alone) may round apart.

    A sequence's log-prob sums ``n`` token log-probs, each out of a forward pass; its size is |log p| plus the
    logit scale (~1) per token (posttrain.testing._rounding.rounding_tolerance): ~3e-3 for |log p| ~ 60, 13 tokens.
    Scoring a padding token, or the wrong row, moves it by a token's log-prob (~4 nats) or more.
    """
    return rounding_tolerance(logps.abs() + lengths, LOGPROB_ROUNDINGS + lengths.max().item())


def _perturb(model, seed=1, scale=0.05):
    """Move the policy away from the reference, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def _setup(dpo_ctx, **fields):
    ctx = dpo_ctx(**fields)
    ctx.model = load_causal_lm(ctx.config.model, ctx.config)
    method = DPO()
    method.setup(ctx)
    return method, ctx


def test_one_concatenated_forward_equals_two_separate_forwards(dpo_ctx, dpo_pairs):
    method, ctx = _setup(dpo_ctx)
    rows = method.prepare(datasets.Dataset.from_list(dpo_pairs(4, seed=3)), ctx)
    batch = method.collate(rows, ctx)
    logps, lengths, _ = completion_logps(ctx.model, batch)
    chosen_only = [{**r, "rejected_ids": r["chosen_ids"]} for r in rows]  # collate gives [chosen; chosen]
    rejected_only = [{**r, "chosen_ids": r["rejected_ids"]} for r in rows]
    chosen = completion_logps(ctx.model, method.collate(chosen_only, ctx))[0][:4]
    rejected = completion_logps(ctx.model, method.collate(rejected_only, ctx))[0][:4]
    tolerance = _logps_tolerance(logps, lengths)
    assert ((logps - torch.cat([chosen, rejected])).abs() <= tolerance).all()
    # and each row alone, without any padding, gives the same numbers
    alone = torch.stack([completion_logps(ctx.model, method.collate([r], ctx))[0] for r in rows])  # (B, 2)
    assert ((logps - torch.cat([alone[:, 0], alone[:, 1]])).abs() <= tolerance).all()
    assert lengths[:4].tolist() == [len(r["chosen_ids"]) for r in rows]


def test_precomputed_reference_equals_live_reference(dpo_ctx, dpo_pairs, logged):
    """Both runs start from the same weights; after the policy moves, the losses and metrics still agree."""
    data = datasets.Dataset.from_list(dpo_pairs(6, seed=4))
    live, live_ctx = _setup(dpo_ctx, beta=0.3)
    pre, pre_ctx = _setup(dpo_ctx, beta=0.3, precompute_ref_log_probs=True, precompute_ref_batch_size=4)
    assert pre.ref_model is None and live.ref_model is not None
    live_rows, pre_rows = live.prepare(data, live_ctx), pre.prepare(data, pre_ctx)
    pre.precompute(pre_rows, pre_ctx)  # the loop's order: prepare (or the cache), then precompute
    assert all("ref_chosen_logps" in r for r in pre_rows)
    _perturb(live_ctx.model)
    _perturb(pre_ctx.model)
    with torch.no_grad():
        a = live.loss(live_ctx.model, live.collate(live_rows, live_ctx), live_ctx)
        b = pre.loss(pre_ctx.model, pre.collate(pre_rows, pre_ctx), pre_ctx)
    assert abs(float(a.loss_sum) - math.log(2) * 6) > 1e-3  # the policy really moved
    # The reference log-probs were computed in batches of 4 (precomputed) and of 6 (live): equal up to rounding.
    # A pair's loss moves by at most beta times its two reference log-probs' differences (the sigmoid's slope is
    # <= 1), so 12 sequences' tolerances times beta bound the loss sum and every reward metric (a mean of <= 12).
    ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in pre_rows]).flatten()
    lengths = torch.tensor([[len(r["chosen_ids"]), len(r["rejected_ids"])] for r in pre_rows]).flatten()
    tolerance = 0.3 * float(_logps_tolerance(ref, lengths).sum())
    assert abs(float(a.loss_sum) - float(b.loss_sum)) <= tolerance
    a_logged, b_logged = logged(a.metrics), logged(b.metrics)
    for name in a_logged:
        assert abs(a_logged[name] - b_logged[name]) <= tolerance, name


def test_loss_is_a_sum_over_pairs_and_log_two_at_init(dpo_ctx, dpo_pairs, logged):
    """Policy == reference: every pair's sigmoid loss is log 2, n_items is the number of pairs."""
    method, ctx = _setup(dpo_ctx)
    rows = method.prepare(datasets.Dataset.from_list(dpo_pairs(5, seed=5)), ctx)
    out = method.loss(ctx.model, method.collate(rows, ctx), ctx)
    assert out.n_items == 5
    # policy and reference are the same forward pass, so every z is exactly 0 and every pair's loss float32(log 2);
    # 5 of them summed in float32 are within 4 roundings of 3.5 (8e-7, 2.4e-7 relative) of 5 log 2
    assert float(out.loss_sum.detach()) == pytest.approx(5 * math.log(2), rel=1e-6)
    metrics = logged(out.metrics)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0
    expected = {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    }
    assert set(out.metrics) == expected
    out.loss_sum.backward()  # differentiable through the one forward


def test_lora_reference_is_the_adapter_disabled_base(dpo_ctx, dpo_pairs):
    pytest.importorskip("peft", reason="the LoRA path needs peft (pip install 'posttrain[peft]')")
    from posttrain.models import apply_peft

    ctx = dpo_ctx(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base = load_causal_lm(ctx.config.model, ctx.config)
    ctx.model = apply_peft(load_causal_lm(ctx.config.model, ctx.config), ctx.config)
    method = DPO()
    method.setup(ctx)
    assert method.ref_model is None  # no second copy in memory
    rows = method.prepare(datasets.Dataset.from_list(dpo_pairs(3, seed=6)), ctx)
    batch = method.collate(rows, ctx)
    _perturb(ctx.model, scale=0.2)  # moves the LoRA weights only
    with torch.no_grad():
        out = method.loss(ctx.model, batch, ctx)
        policy_logps = completion_logps(ctx.model, batch)[0]
        base_logps = completion_logps(base, batch)[0]
    assert not torch.allclose(policy_logps, base_logps)
    beta = ctx.config.beta
    margins = (policy_logps[:3] - base_logps[:3]) - (policy_logps[3:] - base_logps[3:])
    # the same forward passes as inside loss(); only the order of the four subtractions may differ: a few roundings
    # of |log p| ~ 60 (~1e-5), times beta 0.1; assert_close's float32 default (atol 1e-5) covers it
    torch.testing.assert_close(out.loss_sum, -torch.nn.functional.logsigmoid(beta * margins).sum())
    # precomputing under LoRA also scores the adapter-disabled base, even once the adapter has moved
    pre_ctx = dpo_ctx(model=ctx.model, use_peft=True, precompute_ref_log_probs=True)
    pre = DPO()
    pre.setup(pre_ctx)
    pre_rows = pre.prepare(datasets.Dataset.from_list(dpo_pairs(3, seed=6)), pre_ctx)
    pre.precompute(pre_rows, pre_ctx)
    got = torch.tensor([[r["ref_chosen_logps"] for r in pre_rows], [r["ref_rejected_logps"] for r in pre_rows]])
    lengths = completion_logps(base, batch)[1]
    assert ((got.flatten() - base_logps).abs() <= _logps_tolerance(base_logps, lengths)).all()  # other batches


def test_reference_free_uses_a_uniform_reference(dpo_ctx, dpo_pairs, logged):
    method, ctx = _setup(dpo_ctx, reference_free=True, beta=0.5)
    assert method.ref_model is None
    rows = method.prepare(datasets.Dataset.from_list(dpo_pairs(3, seed=7)), ctx)
    batch = method.collate(rows, ctx)
    with torch.no_grad():
        out = method.loss(ctx.model, batch, ctx)
        logps = completion_logps(ctx.model, batch)[0]
    # the same forward pass as inside loss(), the formula written out: a few roundings of numbers <= 60, relative
    # ~1e-6 at most; a missing beta or a live reference move it by far more
    assert logged(out.metrics)["rewards/chosen"] == pytest.approx(float(0.5 * logps[:3].mean()), rel=1e-6)
    expected = -torch.nn.functional.logsigmoid(0.5 * (logps[:3] - logps[3:])).sum()
    torch.testing.assert_close(out.loss_sum, expected)


def test_logged_metrics_do_not_depend_on_how_pairs_fall_into_micro_batches(dpo_ctx, dpo_pairs, logged):
    """Metrics are sums over pairs (and tokens) with their counts, so 1 + 3 pairs log what 4 pairs in one batch do.

    A mean of per-micro-batch means would weight the lone pair 3x: the check fails if a metric becomes a plain mean.
    """
    method, ctx = _setup(dpo_ctx, beta=0.3)
    rows = method.prepare(datasets.Dataset.from_list(dpo_pairs(4, seed=8)), ctx)
    _perturb(ctx.model)  # rewards, accuracies and margins differ from pair to pair
    with torch.no_grad():
        whole = method.loss(ctx.model, method.collate(rows, ctx), ctx).metrics
        split = [method.loss(ctx.model, method.collate(part, ctx), ctx).metrics for part in (rows[:1], rows[1:])]
    together, apart = logged(whole), logged(*split)
    assert together.keys() == apart.keys()
    for name, value in together.items():
        assert apart[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    chosen_means = [logged(m)["rewards/chosen"] for m in split]
    assert abs((chosen_means[0] + chosen_means[1]) / 2 - together["rewards/chosen"]) > 1e-4  # the split matters
