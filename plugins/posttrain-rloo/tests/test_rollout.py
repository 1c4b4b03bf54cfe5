"""RLOO's rollout: KL penalty in the reward, reward clipping, reward errors, reused rollouts."""

from __future__ import annotations

import sys

import datasets
import pytest
import torch
from posttrain import ConfigError, TrainContext
from posttrain.rewards import RewardError
from posttrain_rloo import RLOO, RLOOConfig, rloo_advantages
from transformers import AutoModelForCausalLM, AutoTokenizer


def setup_method(model_dir, rewards, **fields):
    config = RLOOConfig(model=str(model_dir), num_generations=4, max_completion_length=5, seed=0, **fields)
    ctx = TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
        rewards=rewards,
    )
    method = RLOO()
    method.setup(ctx)
    rows = method.prepare(datasets.Dataset.from_list([{"prompt": "ab"}, {"prompt": "abcd"}]), ctx)
    return method, ctx, method.collate(rows, ctx)


def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def test_rewards_clip_then_kl_then_leave_one_out(rloo_tiny_model):
    """With a reference that differs from the policy, advantages = RLOO(clip(r) − β·KL_seq): recomputed here
    from the rollout's own old and reference log-probs."""
    method, ctx, batch = setup_method(
        rloo_tiny_model, {"length": length}, beta=0.5, reward_clip_range=[0.0, 3.0], num_iterations=2
    )
    with torch.no_grad():  # a reference that is not the policy
        for p in method.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (out,) = method.rollout(ctx.model, [batch], ctx)
    mask = out["completion_mask"]
    with torch.no_grad():
        ref = method.ref_model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
        ref = torch.log_softmax(ref[:, -mask.size(1) - 1 : -1], -1).gather(
            2, out["input_ids"][:, -mask.size(1) :, None]
        )[..., 0]
    texts = [
        ctx.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
        for ids, m in zip(out["input_ids"][:, -mask.size(1) :], mask)
    ]
    rewards = torch.tensor([min(float(len(t)), 3.0) for t in texts])
    kl = ((out["old_logps"] - ref) * mask).sum(-1)
    rewards = rewards - 0.5 * kl
    # the rollout scored the reference in its own forward call: each completion's summed log-probs may round apart
    # from ours by a forward pass's bound (posttrain.testing._rounding), of size |log p| plus the logit scale per token;
    # times beta 0.5, and twice (an advantage is a reward minus the mean of the others)
    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    n = mask.sum(-1)
    per_row = rounding_tolerance((ref.abs() * mask).sum(-1) + n, LOGPROB_ROUNDINGS + int(n.max()))
    tolerance = 2 * 0.5 * float(per_row.max())
    assert ((out["advantages"] - rloo_advantages(rewards, 4)[0]).abs() <= tolerance).all()
    assert out["metrics"]["kl"] != 0.0 and out["metrics"]["reward"] == pytest.approx(
        sum(len(t) for t in texts) / 8
    )  # the logged reward is before clipping and KL, as in TRL


def test_loss_metrics_and_item_count(rloo_tiny_model):
    method, ctx, batch = setup_method(rloo_tiny_model, {"length": length})
    out = method.loss(ctx.model, method.rollout(ctx.model, [batch], ctx)[0], ctx)
    assert out.n_items == 8
    for key in (
        "reward",
        "reward_std",
        "rewards/length/mean",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "frac_reward_zero_std",
    ):
        assert key in out.metrics, key
    # the reference is the initial policy, scored by the same function on the same inputs: k1 is 0
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-5)


def test_reward_errors_name_the_prompt(rloo_tiny_model):
    def broken(prompts, completions, **columns):
        raise KeyError("solution")

    method, ctx, batch = setup_method(rloo_tiny_model, {"broken": broken}, beta=0.0)
    with pytest.raises(RewardError, match=r"'broken' raised on completion 0 of dataset row 0 at step 1.*KeyError"):
        method.rollout(ctx.model, [batch], ctx)


def test_vllm_backend_without_vllm_installed_is_a_clear_error(rloo_tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"pip install 'posttrain\[vllm\]'"):
        setup_method(rloo_tiny_model, {"length": length}, generation_backend="vllm")


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        from posttrain.config import build_config

        build_config(RLOOConfig, {"num_generations": 1, "reward_clip_range": [2.0, 1.0], "epsilon": -1})
    text = str(info.value)
    assert "3 problems" in text and "num_generations" in text and "reward_clip_range" in text
