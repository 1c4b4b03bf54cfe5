"""GRPO's rollout on top of core's generation service: advantages, the extra log-probs it computes only when
needed, importance-sampling correction, TRL's metric names, and the config's batch semantics."""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import ConfigError, TrainContext
from posttrain.config import build_config
from posttrain.generation import Completions, collate_prompts
from posttrain_grpo import GRPO, GRPOConfig
from transformers import AutoModelForCausalLM, AutoTokenizer


def setup_method(model_dir, rewards=None, **fields):
    config = GRPOConfig(model=str(model_dir), num_generations=4, max_completion_length=5, seed=0, **fields)
    ctx = TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
        rewards=rewards
        if rewards is not None
        else {"len": lambda prompts, completions, **c: [len(x) for x in completions]},
    )
    method = GRPO()
    method.setup(ctx)
    return method, ctx, ctx.model


def batch_for(method, ctx, prompts):
    rows = method.prepare(
        datasets.Dataset.from_list([{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)]), ctx
    )
    return collate_prompts(rows, ctx.tokenizer.pad_token_id)


def test_rollout_tensors_advantages_and_reward_metrics(grpo_tiny_model):
    method, ctx, model = setup_method(grpo_tiny_model)
    (out,) = method.rollout(model, [batch_for(method, ctx, ["ab", "abcd"])], ctx)
    n, c = out["completion_mask"].shape
    assert n == 8 and out["input_ids"].shape == (8, 4 + c) and out["advantages"].shape == (8,)
    assert "old_logps" not in out and "ref_logps" not in out  # mu = 1, beta = 0, hf: no extra forward passes
    # each group's advantages sum to 0, up to float32 rounding of the ~12 operations behind them (sizes |A| summed;
    # posttrain.testing._rounding); a group mean taken over the wrong rows moves the sum by ~0.1 or more
    from posttrain.testing._rounding import rounding_tolerance

    advantages = out["advantages"][:4]
    assert abs(float(advantages.sum())) <= rounding_tolerance(float(advantages.abs().sum()), 12, sides=1)
    for key in ("reward", "reward_std", "rewards/len/mean", "frac_reward_zero_std", "completions/mean_length"):
        assert key in out["metrics"], key


def test_loss_metrics_use_trl_names(grpo_tiny_model):
    method, ctx, model = setup_method(grpo_tiny_model, beta=0.1)
    (batch,) = method.rollout(model, [batch_for(method, ctx, ["ab", "abcd"])], ctx)
    assert "ref_logps" in batch
    out = method.loss(model, batch, ctx)
    for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "reward"):
        assert key in out.metrics, key
    # policy == reference at the start: the same forward pass, so the per-token k3 is 0; it is also second order in
    # any rounding difference d (k3 ~ d^2 / 2), so 1e-6 holds for d up to 1e-3
    assert float(out.metrics["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert int(out.n_items) == int(batch["completion_mask"].sum())


def test_num_iterations_computes_old_logps_and_asks_the_loop_to_reuse(grpo_tiny_model):
    method, ctx, model = setup_method(grpo_tiny_model, num_iterations=3)
    (batch,) = method.rollout(model, [batch_for(method, ctx, ["ab", "abcd"])], ctx)
    assert batch["old_logps"].shape == batch["completion_mask"].shape
    assert method.batch_reuse(ctx.config) == 3


def test_importance_sampling_correction_weights_samples_from_another_engine(grpo_tiny_model):
    """A generator that reports its own log-probs (here: the trainer's minus log 2 on every token, i.e. the
    trainer finds each token twice as likely) gets weights ratio = 2 per token, capped by the mode's bounds."""
    method, ctx, model = setup_method(grpo_tiny_model, importance_sampling_mode="token_truncate")
    inner = method.generator

    class Shifted:
        name, reports_logps = "shifted", True

        def generate(self, prompt_ids, n, seeds=None):
            done = inner.generate(prompt_ids, n, seeds)
            from posttrain.ops import completion_logps

            logps = []
            for prompt, ids in zip([p for p in prompt_ids for _ in range(n)], done.token_ids):
                full = torch.tensor([prompt + ids])
                lp, _ = completion_logps(model, full, torch.ones_like(full), len(ids), ctx.config.temperature)
                logps.append((lp[0] - torch.log(torch.tensor(2.0))).tolist())
            return Completions(done.token_ids, done.truncated, logps)

        def sync_weights(self, model):
            pass

        def close(self):
            pass

    method.generator = Shifted()
    (batch,) = method.rollout(model, [batch_for(method, ctx, ["ab", "abcd"])], ctx)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(batch["is_weights"][mask], torch.full((int(mask.sum()),), 2.0), atol=1e-4)
    assert batch["metrics"]["importance_sampling/ratio_mean"] == pytest.approx(2.0, abs=1e-3)
    out = method.loss(model, batch, ctx)
    assert torch.isfinite(out.loss_sum)
    ctx.config.importance_sampling_correction = False
    (plain,) = method.rollout(model, [batch_for(method, ctx, ["ab"])], ctx)
    assert "is_weights" not in plain


def test_batch_size_counts_completions_as_in_trl(grpo_tiny_model):
    method = GRPO()
    config = build_config(GRPOConfig, {"num_generations": 4, "per_device_train_batch_size": 8})
    assert method.rows_per_batch(config, 8) == 2
    with pytest.raises(ConfigError, match="must be a multiple of num_generations"):
        build_config(GRPOConfig, {"num_generations": 4, "per_device_train_batch_size": 6})


def test_use_vllm_is_a_deprecated_alias(recwarn):
    with pytest.warns(FutureWarning, match="generation_backend"):
        config = GRPOConfig(use_vllm=True)
    assert config.generation_backend == "vllm" and config.use_vllm is False
