"""A tiny model learns from KTO; the reference paths (live, precomputed, LoRA) agree; padding changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from posttrain import TrainContext
from posttrain.config import build_config
from posttrain.loop import train
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.ops import sequence_logps
from posttrain.testing.kit import check_grad_accumulation, check_padding_invariance
from posttrain_kto import KTO, KTOConfig


def run(model_dir, tmp_path, rows, **fields):
    values = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 6,
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": True,
        "overwrite_output_dir": True,
        "seed": 0,
        **fields,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(KTO(), build_config(KTOConfig, values), train_dataset=rows).log_history


def test_tiny_model_learns_desirable_over_undesirable(kto_model_dir, tmp_path, kto_rows):
    history = run(kto_model_dir, tmp_path, kto_rows, max_steps=10)
    losses = [row["loss"] for row in history]
    margins = [row["rewards/margins"] for row in history]
    # step 1: policy == reference, so r = 0, z0 = 0 and every loss is (1 - sigma(0)) = 0.5
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and history[0]["kl"] == 0.0
    assert losses[-1] < losses[0] - 0.005, losses
    assert margins[-1] > 0.05 and margins[-1] > margins[1], margins
    assert history[-1]["rewards/chosen"] > 0 > history[-1]["rewards/rejected"]
    assert all(row["kl"] >= 0 for row in history)


def test_first_step_loss_is_the_weighted_half(kto_model_dir, tmp_path, kto_rows):
    """At step 1 every loss is lambda/2: (8 * 2.0 * 0.5 + 8 * 0.5 * 0.5) / 16 = 0.625 with lambda_D=2, lambda_U=0.5."""
    history = run(
        kto_model_dir,
        tmp_path,
        kto_rows,
        max_steps=1,
        per_device_train_batch_size=16,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    assert history[0]["loss"] == pytest.approx(0.625, abs=1e-6)


def test_kl_point_matches_a_hand_computation_on_the_model(kto_model_dir, kto_rows):
    """z0 = max(0, mean_i [log pi(c_{i-1}|x_i) - log pi_ref(c_{i-1}|x_i)]) recomputed from the collated KL pairs
    with a perturbed policy (so z0 != 0) and the original model as reference."""
    config = KTOConfig(model=str(kto_model_dir), max_length=64)
    tokenizer = load_tokenizer(str(kto_model_dir))
    policy = load_causal_lm(str(kto_model_dir), config)
    ctx = TrainContext(config=config, tokenizer=tokenizer, model=policy, model_path=str(kto_model_dir), training=False)
    method = KTO()
    method.setup(ctx)
    with torch.no_grad():
        torch.manual_seed(0)
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    batch = method.collate(method.prepare(kto_rows[:6], ctx), ctx)
    with torch.no_grad():
        out = method.loss(policy, batch, ctx)
        args = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
        diff = sequence_logps(policy, *args)[0] - sequence_logps(method.ref, *args)[0]
    assert out.metrics["kl"].item() == pytest.approx(max(0.0, diff.mean().item()), abs=1e-5)
    assert out.n_items == 6


def test_padding_does_not_change_the_kto_loss(kto_model_dir, kto_rows):
    """The same micro-batch collated wider (extra right padding on every sequence) gives the same loss sum."""
    config = KTOConfig(model=str(kto_model_dir), max_length=64)
    tokenizer = load_tokenizer(str(kto_model_dir))
    model = load_causal_lm(str(kto_model_dir), config).eval()
    ctx = TrainContext(config=config, tokenizer=tokenizer, model=model, model_path=str(kto_model_dir), training=False)
    method = KTO()
    method.setup(ctx)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # policy != reference
        batch = method.collate(method.prepare(kto_rows[:4], ctx), ctx)
        wide = {k: torch.nn.functional.pad(v, (0, 7)) if v.dim() == 2 else v for k, v in batch.items()}
        a, b = method.loss(model, batch, ctx), method.loss(model, wide, ctx)
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-5)
    assert float(a.metrics["kl"]) == pytest.approx(float(b.metrics["kl"]), rel=1e-5, abs=1e-6)


def test_precomputed_reference_matches_live_reference_on_a_full_batch(kto_model_dir, tmp_path, kto_rows):
    """With one micro-batch holding every row, in-batch rotation and the fixed partners are the same pairs."""
    live = run(kto_model_dir, tmp_path / "live", kto_rows, max_steps=3, per_device_train_batch_size=16)
    pre = run(
        kto_model_dir,
        tmp_path / "pre",
        kto_rows,
        max_steps=3,
        per_device_train_batch_size=16,
        precompute_ref_log_probs=True,
    )
    for a, b in zip(live, pre):
        for key in ("loss", "kl", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])


def test_lora_reference_is_the_adapter_free_base(kto_model_dir, tmp_path, kto_rows):
    """With LoRA there is no reference copy: at step 1 (B = 0) policy == base, so the loss is exactly 0.5."""
    pytest.importorskip("peft")
    history = run(kto_model_dir, tmp_path, kto_rows, max_steps=3, use_peft=True, lora_r=4, learning_rate=1e-2)
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert history[-1]["rewards/margins"] != 0.0  # the adapter moved away from the reference


def test_apo_zero_unpaired_is_padding_and_accumulation_invariant(kto_model_dir, tmp_path, kto_rows):
    """Without the in-batch KL point, every per-example loss is independent of the batch: the kit's checks hold."""
    overrides = {"loss_type": "apo_zero_unpaired", "max_length": 64}
    check_padding_invariance(KTO, kto_rows, kto_model_dir, overrides)
    check_grad_accumulation(KTO, kto_rows, kto_model_dir, tmp_path, overrides)


def test_kind_metrics_pool_rows_over_micro_batches(kto_model_dir, kto_rows):
    """rewards/* and logps/* are sums over the rows of a kind with their counts, as TRL's KTO logs them: a micro-batch
    with 1 desirable row and one with 3 log what the 4 together do (a mean of the two means would not)."""
    from posttrain import Metric

    config = KTOConfig(model=str(kto_model_dir), max_length=64)
    tokenizer = load_tokenizer(str(kto_model_dir))
    model = load_causal_lm(str(kto_model_dir), config).eval()
    ctx = TrainContext(config=config, tokenizer=tokenizer, model=model, model_path=str(kto_model_dir), training=False)
    method = KTO()
    method.setup(ctx)
    with torch.no_grad():
        torch.manual_seed(0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))  # rewards differ row to row
    rows = method.prepare(kto_rows[:8], ctx)  # desirable rows are the even ones
    parts = (rows[:2], rows[2:])  # 1 desirable + 1 undesirable, then 3 + 3
    with torch.no_grad():
        whole = method.loss(model, method.collate(rows, ctx), ctx).metrics
        split = [method.loss(model, method.collate(part, ctx), ctx).metrics for part in parts]

    def pooled(*metric_dicts, name):
        values = [m[name] for m in metric_dicts]
        assert all(isinstance(v, Metric) and v.kind == "ratio" for v in values), name
        return sum(float(v.value) for v in values) / sum(float(v.denominator) for v in values)

    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert pooled(*split, name=name) == pytest.approx(pooled(whole, name=name), rel=1e-5), name
    means = [pooled(m, name="rewards/chosen") for m in split]
    assert abs(sum(means) / 2 - pooled(whole, name="rewards/chosen")) > 1e-4  # the grouping would matter
