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
from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance
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


def measure_learning(model_dir, out_dir, rows, seed: int = 0) -> dict[str, float]:
    """The run of test_tiny_model_learns_desirable_over_undesirable (``benchmarks/calibrate_learning.py kto`` runs it
    over seeds and thread counts); ``rows`` are the conftest's ``make_kto_rows()``."""
    history = run(model_dir, out_dir, rows, max_steps=10, seed=seed)
    losses = [row["loss"] for row in history]
    margins = [row["rewards/margins"] for row in history]
    return {
        "first_loss": losses[0],
        "first_kl": history[0]["kl"],
        "min_kl": min(row["kl"] for row in history),
        "loss_drop": losses[0] - losses[-1],
        "last_margin": margins[-1],
        "margin_rise": margins[-1] - margins[1],
        "last_chosen_reward": history[-1]["rewards/chosen"],
        "last_rejected_reward": history[-1]["rewards/rejected"],
    }


def sequence_tolerance(logps: torch.Tensor, n_tokens: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """Per sequence: how far two computations of its log-prob, grouped differently (another batch, more padding),
    may round apart. A sum of n token log-probs out of a forward pass; its size is |log p| plus the logits' scale
    per token (posttrain.testing._rounding.rounding_tolerance). A KTO loss moves by at most beta / 4 times the changes
    of r and z0 (the sigmoid's slope is <= 1/4); a padding token scored, or the wrong reference, moves a sequence's
    log-prob by several nats.
    """
    return rounding_tolerance(logps.abs() + logit_scale * n_tokens, LOGPROB_ROUNDINGS + int(n_tokens.max()))


def test_tiny_model_learns_desirable_over_undesirable(kto_model_dir, tmp_path, kto_rows):
    """Every measure comes from the logits of the training rows (no sampling).

    Calibration (``python benchmarks/calibrate_learning.py kto --seeds 0-4 --threads 1 2``, 2026-11-30, 10 runs):
    step 1's loss 0.5 and KL point 0 in every run; the loss fell by 0.084 at least by step 10 (mean 0.093); the last
    reward margin 0.68 at least, 0.55 above step 2's; chosen rewards 0.34 at least, rejected -0.34 at most; the KL
    point never negative. Thresholds: a drop of 0.04, a margin of 0.34 and a rise of 0.27 (about half the minimum
    each), rewards on the right side of 0.
    """
    m = measure_learning(kto_model_dir, tmp_path, kto_rows)
    # step 1: policy == reference computed the same way, so r = 0 and z0 = 0 exactly and every loss is
    # 1 - sigmoid(0) = 0.5, exact in float32; the mean over 8 rows is exact too (sums of 0.5)
    assert m["first_loss"] == 0.5 and m["first_kl"] == 0.0, m
    assert m["loss_drop"] > 0.04, m
    assert m["last_margin"] > 0.34 and m["margin_rise"] > 0.27, m
    assert m["last_chosen_reward"] > 0 > m["last_rejected_reward"], m
    assert m["min_kl"] >= 0, m


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
    # policy == reference, computed the same way: r = z0 = 0 exactly, every loss is lambda * (1 - sigmoid(0)) =
    # lambda / 2 (1.0 or 0.25), and their mean is exact in float32
    assert history[0]["loss"] == 0.625


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
        (kl, n, _), (ref_kl, _, _) = sequence_logps(policy, *args), sequence_logps(method.ref, *args)
    # the perturbed head gives logits of size ~5: logit scale 10 per token
    tolerance = float((sequence_tolerance(kl, n, 10.0) + sequence_tolerance(ref_kl, n, 10.0)).mean())
    assert abs(out.metrics["kl"].item() - max(0.0, (kl - ref_kl).mean().item())) <= tolerance
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
        # the same sequences' log-probs, padded less and more, round apart by at most sequence_tolerance each
        # (logits scaled by 1.5: scale 2), for the policy and the reference alike
        main = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pairs = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
        delta_r = sum(sequence_tolerance(*sequence_logps(m, *main)[:2], 2.0) for m in (model, method.ref))
        delta_z0 = float(
            sum(sequence_tolerance(*sequence_logps(m, *pairs)[:2], 2.0) for m in (model, method.ref)).mean()
        )
    beta = config.beta
    assert abs(float(a.loss_sum) - float(b.loss_sum)) <= beta / 4 * float((delta_r + delta_z0).sum())
    assert abs(float(a.metrics["kl"]) - float(b.metrics["kl"])) <= delta_z0


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
    # The reference log-probs were computed in batches of 8 (precomputed) and 16 (live): equal up to rounding, at
    # most sequence_tolerance for sequences of <= 8 completion tokens of <= 7 nats (2.4e-3). r and z0 move by that
    # much, the loss (a mean) by beta / 4 times both, the margin (beta times a difference of means of r) by 2 beta
    # times it; the weights they lead to differ by AdamW's rounding, negligible here over 3 steps.
    seq = float(sequence_tolerance(torch.tensor([8 * 7.0]), torch.tensor([8])))
    beta = KTOConfig().beta
    tolerance = {"loss": beta / 4 * 2 * seq, "kl": seq, "rewards/margins": 2 * beta * seq}
    for a, b in zip(live, pre):
        for key in ("loss", "kl", "rewards/margins"):
            assert abs(a[key] - b[key]) <= tolerance[key], (key, a[key], b[key])


def test_lora_reference_is_the_adapter_free_base(kto_model_dir, tmp_path, kto_rows):
    """With LoRA there is no reference copy: at step 1 (B = 0) policy == base, so the loss is exactly 0.5."""
    pytest.importorskip("peft")
    history = run(kto_model_dir, tmp_path, kto_rows, max_steps=3, use_peft=True, lora_r=4, learning_rate=1e-2)
    # the adapter adds B A x = 0 exactly, so policy and reference are the base model's arithmetic, bitwise
    assert history[0]["loss"] == 0.5
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
