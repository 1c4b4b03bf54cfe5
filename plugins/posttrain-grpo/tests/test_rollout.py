"""Generation, reward calls and the rollout tensors: EOS and length limits, seeding, reward errors."""

from __future__ import annotations

import sys
import types

import datasets
import pytest
import torch
from posttrain import ConfigError, PluginError, TrainContext
from posttrain_grpo import GRPO, GRPOConfig, RewardError
from posttrain_grpo.rollout import (
    completion_tensors,
    generation_config,
    hf_generate,
    resolve_reward_funcs,
    score_completions,
    weighted_rewards,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


def setup_method(model_dir, rewards=None, model=None, **fields):
    config = GRPOConfig(model=str(model_dir), num_generations=4, max_completion_length=5, seed=0, **fields)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir)
    ctx = TrainContext(
        config=config,
        tokenizer=tok,
        model=model,
        model_path=str(model_dir),
        rewards=rewards
        if rewards is not None
        else {"len": lambda prompts, completions, **c: [len(x) for x in completions]},
    )
    method = GRPO()
    method.setup(ctx)
    return method, ctx, model


def batch_for(method, ctx, prompts):
    rows = method.prepare(
        datasets.Dataset.from_list([{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)]), ctx
    )
    return method.collate(rows, ctx)


def forced_model(model_dir, token_id):
    """The tiny model with an LM head that always prefers ``token_id`` (greedy or sampled alike)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-30.0)
        head.bias[token_id] = 30.0
    model.lm_head = head
    return model


def test_completion_tensors_cut_after_the_first_eos():
    ids, mask, truncated, lengths = completion_tensors([[5, 1, 7, 7], [5, 6, 7, 8], [1, 0, 0, 0]], [1], 0, "cpu")
    assert torch.equal(ids, torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert truncated.tolist() == [False, True, False] and lengths.tolist() == [2, 4, 1]


@pytest.mark.parametrize("per_prompt", [True, False])
def test_generation_stops_at_eos(grpo_tiny_model, per_prompt):
    tok = AutoTokenizer.from_pretrained(grpo_tiny_model)
    method, ctx, model = setup_method(
        grpo_tiny_model, model=forced_model(grpo_tiny_model, tok.eos_token_id), per_prompt_generation=per_prompt
    )
    out = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    assert out["completion_mask"].shape == (8, 1)
    assert (out["input_ids"][:, -1] == tok.eos_token_id).all()
    assert out["metrics"]["completions/clipped_ratio"] == 0.0 and out["metrics"]["completions/mean_length"] == 1.0


def test_generation_respects_max_completion_length(grpo_tiny_model):
    tok = AutoTokenizer.from_pretrained(grpo_tiny_model)
    seven = tok.convert_tokens_to_ids("7")
    method, ctx, model = setup_method(
        grpo_tiny_model, model=forced_model(grpo_tiny_model, seven), mask_truncated_completions=True
    )
    out = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    assert out["completion_mask"].shape == (8, 5)
    assert (out["input_ids"][:, -5:] == seven).all()
    assert out["metrics"]["completions/clipped_ratio"] == 1.0
    assert out["completion_mask"].sum() == 0  # every completion was truncated, so none is trained on


def test_per_prompt_sampling_does_not_depend_on_the_batch(grpo_tiny_model):
    """A prompt's group depends on (seed, step, row) only: alone or next to another prompt, same tokens."""
    method, ctx, model = setup_method(grpo_tiny_model)
    tok = ctx.tokenizer
    gen = method.generation_config
    seeds = [11, 22]
    alone = hf_generate(model, [tok("abcd").input_ids], 4, gen, tok.pad_token_id, seeds[1:])
    together = hf_generate(model, [tok("a").input_ids, tok("abcd").input_ids], 4, gen, tok.pad_token_id, seeds)
    assert together[4:] == alone
    again = hf_generate(model, [tok("abcd").input_ids], 4, gen, tok.pad_token_id, [23])
    assert again != alone  # another seed, another sample
    state = torch.get_rng_state()
    hf_generate(model, [tok("abcd").input_ids], 4, gen, tok.pad_token_id, [5])
    assert torch.equal(state, torch.get_rng_state())  # the global RNG stream is left untouched


def test_rollout_tensors_and_reward_metrics(grpo_tiny_model):
    method, ctx, model = setup_method(grpo_tiny_model)
    out = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    n, c = out["completion_mask"].shape
    assert n == 8 and out["input_ids"].shape == (8, 4 + c) and out["advantages"].shape == (8,)
    assert torch.equal(out["input_ids"][:4, :4], torch.tensor([[0, 0, 5, 6]] * 4))  # prompt repeated G times
    assert "old_logps" not in out and "ref_logps" not in out  # mu = 1, beta = 0: no extra forward passes
    lengths = out["completion_mask"].sum(1).float()
    # the "len" reward is the decoded length; each group's advantages sum to 0, up to float32 rounding of the ~12
    # operations behind them (posttrain.testing._rounding: sizes |A| summed)
    from posttrain.testing._rounding import rounding_tolerance

    advantages = out["advantages"][:4]
    assert abs(float(advantages.sum())) <= rounding_tolerance(float(advantages.abs().sum()), 12, sides=1)
    for key in (
        "reward",
        "reward_std",
        "rewards/len/mean",
        "rewards/len/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
    ):
        assert key in out["metrics"], key
    assert out["metrics"]["completions/mean_length"] == pytest.approx(float(lengths.mean()))


def test_loss_metrics_use_trl_names(grpo_tiny_model):
    method, ctx, model = setup_method(grpo_tiny_model, beta=0.1)
    batch = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    assert "ref_logps" in batch
    out = method.loss(model, batch, ctx)
    for key in (
        "kl",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_max",
        "reward",
    ):
        assert key in out.metrics, key
    # policy == reference at the start: the same forward pass, so the per-token k3 is 0; it is also second order in
    # any rounding difference d (k3 ~ d^2 / 2), so 1e-6 holds for d up to 1e-3
    assert float(out.metrics["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert int(out.n_items) == int(batch["completion_mask"].sum())


def test_none_rewards_carry_no_weight():
    """w = (1, 2). Row 0: 1·1 + 2·3 = 7. Row 1: f2 returned None -> 1·2 = 2. Row 2: both None -> NaN."""
    per_func = torch.tensor([[1.0, 3.0], [2.0, float("nan")], [float("nan"), float("nan")]])
    out = weighted_rewards(per_func, torch.tensor([1.0, 2.0]))
    assert out[:2].tolist() == [7.0, 2.0] and torch.isnan(out[2])


def test_reward_error_names_the_reward_the_prompt_and_the_exception():
    def picky(prompts, completions, **columns):
        return [1 / 0 if c == "bad" else 1.0 for c in completions]

    completions = ["ok", "ok", "ok", "bad"]
    with pytest.raises(RewardError) as info:
        score_completions(["picky"], [picky], ["p0", "p0", "p1", "p1"], completions, {}, [[1]] * 4, [7, 9], 2, step=3)
    text = str(info.value)
    assert "'picky'" in text and "completion 1 of prompt 1" in text and "dataset row 9" in text
    assert "ZeroDivisionError" in text and "step 3" in text


def test_reward_returning_the_wrong_count_or_a_non_number_is_an_error():
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        score_completions(
            ["short"], [lambda prompts, completions: [1.0]], ["p", "p"], ["a", "b"], {}, [[1], [1]], [0], 2
        )
    with pytest.raises(RewardError, match=r"returned 'high' for completion 1 of prompt 0"):
        score_completions(
            ["word"], [lambda prompts, completions: [1.0, "high"]], ["p", "p"], ["a", "b"], {}, [[1], [1]], [0], 2
        )


def test_columns_and_completion_ids_reach_reward_functions():
    seen = {}

    def strict(prompts, completions, answer):  # no **kwargs: gets no completion_ids
        seen["answer"] = answer
        return [0.0] * len(completions)

    def wants_ids(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(i)) for i in completion_ids]

    out = score_completions(
        ["strict", "ids"], [strict, wants_ids], ["p", "p"], ["a", "b"], {"answer": ["1", "1"]}, [[4, 1], [5]], [0], 2
    )
    assert seen == {"answer": ["1", "1"], "ids": [[4, 1], [5]]} and out[:, 1].tolist() == [2.0, 1.0]


def test_reward_funcs_resolve_through_the_hook_and_report_problems():
    names, funcs, weights = resolve_reward_funcs(GRPOConfig(reward_funcs=["grpo_exact"]), {}, "grpo")
    assert names == ["grpo_exact"] and funcs[0].__name__ == "grpo_exact" and weights.tolist() == [1.0]
    with pytest.raises(ConfigError, match="needs at least one reward function"):
        resolve_reward_funcs(GRPOConfig(), {}, "grpo")
    with pytest.raises(PluginError, match="unknown reward 'nope'"):
        resolve_reward_funcs(GRPOConfig(reward_funcs=["nope"]), {}, "grpo")
    config = GRPOConfig()
    config.reward_weights = [1.0, 2.0]
    with pytest.raises(ConfigError, match="2 values for 1 reward"):
        resolve_reward_funcs(config, {"a": lambda prompts, completions: []}, "grpo")


def test_num_iterations_reuses_each_micro_batch_rollout(grpo_tiny_model):
    """mu = 2: step 0 generates and keeps the rollout of micro-batch 0 (with its old log-probs); step 1 gets it
    back whatever prompts the loop hands over; the kept rollout survives state_dict / load_state_dict."""
    method, ctx, model = setup_method(grpo_tiny_model, num_iterations=2)
    first = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    assert "old_logps" in first and first["old_logps"].shape == first["completion_mask"].shape
    ctx.step = 1
    again = method.rollout(model, batch_for(method, ctx, ["zz", "zzz"]), ctx)
    assert torch.equal(again["input_ids"], first["input_ids"])
    fresh = GRPO()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh._buffer[0]["old_logps"], first["old_logps"])
    ctx.step = 2
    new = method.rollout(model, batch_for(method, ctx, ["zz", "zzz"]), ctx)
    assert not torch.equal(new["input_ids"][:, :3], first["input_ids"][:, :3])


def test_use_vllm_without_vllm_installed_is_a_clear_error(grpo_tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'posttrain-grpo\[vllm\]'"):
        setup_method(grpo_tiny_model, use_vllm=True)


def test_vllm_backend_wiring_with_a_stand_in_engine(grpo_tiny_model, monkeypatch):
    """The vLLM path with a stand-in ``vllm`` module: weights pushed once per step, one seeded
    SamplingParams per prompt, and the token lists flow into the same rollout tensors."""
    calls = {"loads": 0, "params": []}

    class Engine:
        def load_weights(self, weights):
            calls["loads"] += 1
            assert len(list(weights)) > 0

    class LLM:
        def __init__(self, model, **kwargs):
            self.llm_engine = types.SimpleNamespace(
                model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=Engine()))
                )
            )

        def reset_prefix_cache(self):
            pass

        def generate(self, prompts, sampling_params, use_tqdm):
            calls["params"] += sampling_params
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7, 8, 1])] * p.n)
                for p in sampling_params
            ]

    class SamplingParams:
        def __init__(self, n, seed, **kwargs):
            self.n, self.seed, self.kwargs = n, seed, kwargs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    method, ctx, model = setup_method(grpo_tiny_model, use_vllm=True)
    out = method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    method.rollout(model, batch_for(method, ctx, ["ab", "abcd"]), ctx)
    assert calls["loads"] == 1  # same step: no second weight push
    assert torch.equal(out["input_ids"][:, -3:], torch.tensor([[7, 8, 1]] * 8))
    seeds = [p.seed for p in calls["params"][:2]]
    assert len(set(seeds)) == 2 and calls["params"][0].kwargs["max_tokens"] == 5


def test_top_k_zero_samples_from_the_whole_vocabulary(grpo_tiny_model):
    """top_k 0 means no top-k filter, as in TRL (transformers fills a top_k of None with its default, 50).

    The scores ``generate`` samples from (after every logits processor) keep all ~100 tokens finite; a top-50
    filter would set the other ~50 to -inf.
    """
    tok = AutoTokenizer.from_pretrained(grpo_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(grpo_tiny_model)
    gen = generation_config(GRPOConfig(max_completion_length=3), tok, [tok.eos_token_id])
    out = model.generate(
        input_ids=torch.tensor([tok("ab").input_ids]),
        generation_config=gen,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert gen.top_k == 0
    assert all(torch.isfinite(scores).all() for scores in out.scores)  # (1, V) per sampled token
