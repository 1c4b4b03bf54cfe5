"""Online DPO's step on top of core's generation, reward and judge services: who ranks, what counts, the
reference (frozen copy or adapter-disabled LoRA policy), TRL's metric names, configuration errors."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from posttrain import ConfigError, TrainContext
from posttrain.config import build_config
from posttrain.rewards import JudgeError, judge
from posttrain_online_dpo import OnlineDPO, OnlineDPOConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

# '1' '2' EOS | 'x' EOS        'x' EOS | 'y' 'z' EOS        'a' EOS | 'b' EOS      (digits are 57..66)
PAIRS = [([58, 59, 1], [28, 1]), ([28, 1], [29, 30, 1]), ([5, 1], [6, 1])]


def set_up(model_dir, rewards=None, model=None, **fields):
    config = OnlineDPOConfig(model=str(model_dir), max_completion_length=4, seed=0, **fields)
    ctx = TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
        rewards=rewards or {},
    )
    method = OnlineDPO()
    method.setup(ctx)
    return method, ctx


def step(method, ctx, prompts=("ab", "abc", "abcd")):
    rows = method.prepare(datasets.Dataset.from_list([{"prompt": p} for p in prompts]), ctx)
    (batch,) = method.rollout(ctx.model, [method.collate(rows, ctx)], ctx)
    return batch, method.loss(ctx.model, batch, ctx)


def value(metric):
    return float(metric.value) / float(metric.denominator) if hasattr(metric, "kind") else float(metric)


def test_a_judge_ranks_the_pairs_and_a_pair_without_preference_carries_no_loss(odpo_tiny_model, odpo_fixed_generator):
    """The test judge (hook-registered, marked @judge) prefers more digits: pair 0 -> first, pairs 1 and 2 have none
    -> no preference. At the start the policy is the reference, so the one ranked pair costs log 2."""
    method, ctx = set_up(odpo_tiny_model, judge="odpo_prefers_digits")
    method.generator = odpo_fixed_generator(PAIRS)
    batch, out = step(method, ctx)
    assert batch["winner"][0] == 0.0 and torch.isnan(batch["winner"][1:]).all()
    assert int(out.n_items) == 1 and float(out.loss_sum.detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert value(out.metrics["pairs/ranked_fraction"]) == pytest.approx(1 / 3)
    assert "objective/scores" not in out.metrics and list(ctx.rewards) == ["odpo_prefers_digits"]


def test_metrics_use_trl_names_and_start_at_the_reference(odpo_tiny_model):
    """Sampled with the real generator. Policy == reference: every log-ratio is 0, so KL, margins and the implicit
    rewards are 0, the loss is log 2 per ranked pair, and the entropy is −mean log π(y|x) > 0."""
    method, ctx = set_up(odpo_tiny_model, reward_funcs=["odpo_short"])
    _, out = step(method, ctx)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores_margin",
        "val/contain_eos_token",
        "beta",
        "reward",
        "rewards/odpo_short/mean",
        "completions/mean_length",
    ):
        assert key in out.metrics, key
    for key in ("objective/kl", "rewards/margins", "rewards/chosen"):
        assert value(out.metrics[key]) == pytest.approx(0.0, abs=1e-5), key
    assert int(out.n_items) == 3 and float(out.loss_sum.detach()) == pytest.approx(3 * math.log(2), abs=1e-4)
    assert value(out.metrics["objective/entropy"]) > 0 and value(out.metrics["objective/scores_margin"]) >= 0


def test_lora_reference_is_the_adapter_disabled_policy(odpo_tiny_model, odpo_fixed_generator):
    """use_peft: no reference copy is loaded; the reference log-probs are the base model's even after the adapter
    has moved (here: perturbed), and the policy's differ from them."""
    from posttrain.models import apply_peft

    config = OnlineDPOConfig(model=str(odpo_tiny_model), use_peft=True, lora_r=4)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(odpo_tiny_model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    method, ctx = set_up(odpo_tiny_model, model=model, use_peft=True, lora_r=4, reward_funcs=["odpo_short"])
    assert method.ref_model is None
    method.generator = odpo_fixed_generator(PAIRS)
    batch, out = step(method, ctx)
    base_method, base_ctx = set_up(odpo_tiny_model, reward_funcs=["odpo_short"])
    base_method.generator = odpo_fixed_generator(PAIRS)
    base_batch, _ = step(base_method, base_ctx)
    torch.testing.assert_close(batch["ref_logps"], base_batch["ref_logps"], rtol=1e-5, atol=1e-5)
    assert abs(value(out.metrics["objective/kl"])) > 1e-3


def test_judge_errors_name_the_dataset_row_and_the_step(odpo_tiny_model, odpo_fixed_generator):
    @judge
    def fussy(prompts, completions, **columns):
        return [0, 0, 2]

    method, ctx = set_up(odpo_tiny_model, rewards={"fussy": fussy}, judge="fussy")
    method.generator = odpo_fixed_generator(PAIRS)
    ctx.step = 4
    with pytest.raises(JudgeError, match="returned 2 for the pair of dataset row 2 at step 5"):
        step(method, ctx)


def test_rewards_and_judges_cannot_stand_in_for_each_other(odpo_tiny_model):
    with pytest.raises(ConfigError, match="'odpo_short' is a reward function, not a pairwise judge"):
        set_up(odpo_tiny_model, judge="odpo_short")
    with pytest.raises(ConfigError, match="'odpo_prefers_digits', a pairwise judge"):
        set_up(odpo_tiny_model, reward_funcs=["odpo_prefers_digits"])
    with pytest.raises(ConfigError, match="has neither: set reward_funcs"):
        set_up(odpo_tiny_model)
    with pytest.raises(ConfigError, match="was given the judge 'odpo_prefers_digits': set judge: odpo_prefers_digits"):
        set_up(odpo_tiny_model, rewards={"odpo_prefers_digits": judge(lambda prompts, completions: [])})


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        build_config(
            OnlineDPOConfig,
            {
                "beta": 0,
                "judge": "j",
                "reward_funcs": ["a"],
                "missing_eos_penalty": -1,
                "max_completion_length": 600,
                "importance_sampling_correction": True,
            },
        )
    text = str(info.value)
    for part in ("beta must be > 0", "both set", "missing_eos_penalty must be >= 0", "a judge gives none"):
        assert part in text, part
    assert "max_completion_length (600) must be smaller than max_length (512)" in text
    assert "importance_sampling_correction is not supported" in text and "6 problems" in text


def test_batch_size_counts_prompts():
    assert OnlineDPO().rows_per_batch(OnlineDPOConfig(), 8) == 8
