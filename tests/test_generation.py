"""posttrain.generation: prompt data, the hf backend (EOS, length limit, seeding, batching), sampling into
rollouts, weight-sync bookkeeping, importance weights, and the vLLM backends against stand-ins."""

from __future__ import annotations

import math
import sys
import types

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, TrainContext
from posttrain.generation import (
    Completions,
    OnlineConfig,
    SamplingParams,
    build_generator,
    collate_prompts,
    importance_weights,
    prepare_prompts,
    sample,
)
from posttrain.rewards import RewardSet
from posttrain.testing import build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ctx_for(model_dir, model=None, **fields) -> TrainContext:
    config = OnlineConfig(model=str(model_dir), max_completion_length=5, seed=0, **fields)
    return TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=model or AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
    )


def batch_of(ctx, prompts, start=0):
    rows = prepare_prompts(
        datasets.Dataset.from_list([{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)]), ctx.tokenizer, "t"
    )
    for i, row in enumerate(rows):
        row["index"] = start + i
    return collate_prompts(rows, ctx.tokenizer.pad_token_id)


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


# -- prompt data ------------------------------------------------------------------------------------------


def test_prepare_keeps_extra_columns_and_row_index(tok):
    rows = prepare_prompts(
        datasets.Dataset.from_list([{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]), tok, "t"
    )
    # character tokenizer: <pad>=0, <|end|>=1, <|system|>=2, <|user|>=3, <|assistant|>=4, 'a'=5, 'b'=6, ...
    assert rows[0] == {"prompt_ids": [5, 6], "prompt": "ab", "columns": {"answer": "1"}, "index": 0}
    assert rows[1]["prompt_ids"] == [5, 6, 7, 8] and rows[1]["index"] == 1


def test_collate_left_pads_prompts_exactly(tok):
    rows = prepare_prompts(
        datasets.Dataset.from_list([{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]), tok, "t"
    )
    batch = collate_prompts(rows, tok.pad_token_id)
    assert torch.equal(batch["prompt_ids"], torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert batch["prompts"] == ["ab", "abcd"] and batch["columns"] == {"answer": ["1", "2"]}
    assert batch["row_index"] == [0, 1]


def test_conversational_prompt_gets_the_generation_prompt(tok):
    rows = prepare_prompts(datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}]), tok, "t")
    h, i = tok.convert_tokens_to_ids(["h", "i"])
    assert rows[0]["prompt_ids"] == [3, h, i, 1, 4]  # <|user|> h i <|end|> <|assistant|>


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"question": "no prompt"}, "missing"),
        ({"prompt": "   "}, "empty"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ],
)
def test_bad_rows_are_all_named(tok, row, words):
    good = {"prompt": [{"role": "user", "content": "fine"}]} if isinstance(row.get("prompt"), list) else {"prompt": "x"}
    with pytest.raises(DataError) as info:
        prepare_prompts(datasets.Dataset.from_list([good, row, good, row]), tok, "grpo")
    assert [(p.row, p.field) for p in info.value.problems] == [(1, "prompt"), (3, "prompt")]
    assert words in str(info.value) and "check-data grpo" in str(info.value)


# -- the hf backend ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_prompt", [True, False])
def test_generation_stops_at_eos(tiny_model_dir, per_prompt):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx = ctx_for(tiny_model_dir, forced_model(tiny_model_dir, tok.eos_token_id), per_prompt_generation=per_prompt)
    (r,) = sample(build_generator(ctx), ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=4)
    assert r.completion_mask.shape == (8, 1) and (r.completion_ids[:, -1] == tok.eos_token_id).all()
    assert r.metrics["completions/clipped_ratio"] == 0.0 and r.metrics["completions/mean_length"] == 1.0
    assert r.completions == [""] * 8  # special tokens are not decoded


def test_generation_respects_max_completion_length(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seven = tok.convert_tokens_to_ids("7")
    ctx = ctx_for(tiny_model_dir, forced_model(tiny_model_dir, seven))
    (r,) = sample(build_generator(ctx), ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=4)
    assert r.completion_mask.shape == (8, 5) and (r.completion_ids == seven).all()
    assert r.is_truncated.all() and r.metrics["completions/clipped_ratio"] == 1.0 and r.completions[0] == "77777"
    assert r.input_ids.shape == (8, 4 + 5) and torch.equal(r.input_ids[:4, :4], torch.tensor([[0, 0, 5, 6]] * 4))


def test_per_prompt_sampling_does_not_depend_on_the_batch(tiny_model_dir):
    """With per_prompt_generation a prompt's group depends on (seed, step, row) only."""
    ctx = ctx_for(tiny_model_dir, per_prompt_generation=True)
    generator = build_generator(ctx)
    together = sample(generator, ctx.model, [batch_of(ctx, ["a", "abcd"])], ctx, num_generations=4)[0]
    alone = sample(generator, ctx.model, [batch_of(ctx, ["abcd"], start=1)], ctx, num_generations=4)[0]
    split = sample(
        generator, ctx.model, [batch_of(ctx, ["a"]), batch_of(ctx, ["abcd"], start=1)], ctx, num_generations=4
    )
    assert together.completions[4:] == alone.completions == split[1].completions
    state = torch.get_rng_state()
    sample(generator, ctx.model, [batch_of(ctx, ["abcd"])], ctx, num_generations=4)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG stream is left untouched
    ctx.step = 1
    later = sample(generator, ctx.model, [batch_of(ctx, ["abcd"], start=1)], ctx, num_generations=4)[0]
    assert later.completions != alone.completions  # another step, another seed


def test_one_generate_call_per_step_and_batch_size_cap(tiny_model_dir, monkeypatch):
    ctx = ctx_for(tiny_model_dir)
    calls = []
    original = ctx.model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(ctx.model, "generate", counting)
    batches = [batch_of(ctx, ["ab", "abc"]), batch_of(ctx, ["abcd", "a"], start=2)]
    out = sample(build_generator(ctx), ctx.model, batches, ctx, num_generations=3)
    assert calls == [12] and [len(r.completions) for r in out] == [6, 6]  # both micro-batches in one call
    calls.clear()
    ctx.config.generation_batch_size = 5
    sample(build_generator(ctx), ctx.model, batches, ctx, num_generations=3)
    assert calls == [5, 5, 2]


def test_evaluation_sampling_leaves_the_training_rng_alone(tiny_model_dir):
    ctx = ctx_for(tiny_model_dir)
    ctx.training = False
    state = torch.get_rng_state()
    sample(build_generator(ctx), ctx.model, [batch_of(ctx, ["ab"])], ctx, num_generations=2)
    assert torch.equal(state, torch.get_rng_state())


def test_hf_backend_reports_its_own_logps_when_asked(tiny_model_dir):
    """The generator's log-probs equal the trainer's recomputation (same model, same temperature)."""
    from posttrain.generation._hf import HFGenerator
    from posttrain.ops import completion_logps

    ctx = ctx_for(tiny_model_dir, temperature=0.7)
    generator = HFGenerator(
        ctx.model, SamplingParams.from_config(ctx.config, ctx.tokenizer, ctx.model), report_logps=True
    )
    (r,) = sample(generator, ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=3)
    trainer, _ = completion_logps(ctx.model, r.input_ids, r.attention_mask, r.completion_ids.size(1), 0.7)
    mask = r.completion_mask.bool()
    # float32 forward in two shapes (incremental decode vs one pass): agreement to a few ulps of log-probs ~ 5
    assert torch.allclose(trainer[mask], r.sampling_logps[mask], atol=1e-4, rtol=0)


# -- scoring and weight sync ------------------------------------------------------------------------------------


def test_rollouts_carry_rewards_and_trl_metrics(tiny_model_dir):
    ctx = ctx_for(tiny_model_dir)
    rewards = RewardSet(
        ["len", "one"],
        [
            lambda prompts, completions, **c: [len(x) for x in completions],
            lambda prompts, completions, **c: [1.0] * len(completions),
        ],
        [1.0, 0.5],
    )
    (r,) = sample(
        build_generator(ctx), ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=4, rewards=rewards
    )
    lengths = torch.tensor([len(c) for c in r.completions], dtype=torch.float32)
    assert torch.allclose(r.rewards, lengths + 0.5) and r.rewards_per_func.shape == (8, 2)
    for key in ("reward", "reward_std", "rewards/len/mean", "rewards/one/std", "completions/mean_length"):
        assert key in r.metrics, key
    assert r.columns == {"answer": ["0"] * 4 + ["1"] * 4}


def test_weights_are_pushed_once_per_optimizer_step(tiny_model_dir):
    ctx = ctx_for(tiny_model_dir)
    pushes = []

    class Recording:
        name, reports_logps = "rec", False

        def generate(self, prompt_ids, n, seeds=None):
            return Completions([[1]] * (len(prompt_ids) * n), [False] * (len(prompt_ids) * n))

        def sync_weights(self, model):
            pushes.append(ctx.step)

        def close(self):
            pass

    gen, batch = Recording(), batch_of(ctx, ["ab"])
    for step in (0, 0, 1, 1, 3):
        ctx.step = step
        sample(gen, ctx.model, [batch], ctx)
    assert pushes == [0, 1, 3]


# -- importance sampling -------------------------------------------------------------------------------------------


def test_importance_weights_modes_match_the_formulas():
    """trainer - sampling log-ratios [[log 2, log 0.5, 0], [log 4, 0, (masked)]], bounds [0.6, 3]."""
    trainer = torch.tensor([[math.log(2.0), math.log(0.5), 0.0], [math.log(4.0), 0.0, 9.0]])
    sampling = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tok_trunc, metrics = importance_weights(trainer, sampling, mask, "token_truncate", 0.6, 3.0)
    assert torch.allclose(tok_trunc[0], torch.tensor([2.0, 0.6, 1.0])) and torch.allclose(
        tok_trunc[1, :2], torch.tensor([3.0, 1.0])
    )
    tok_mask, _ = importance_weights(trainer, sampling, mask, "token_mask", 0.6, 3.0)
    assert torch.allclose(tok_mask[0], torch.tensor([2.0, 0.0, 1.0])) and float(tok_mask[1, 0]) == 0.0
    seq_trunc, _ = importance_weights(trainer, sampling, mask, "sequence_truncate", None, 3.0)
    assert torch.allclose(seq_trunc, torch.tensor([[1.0], [3.0]]))  # exp(log 2 + log .5) = 1; exp(log 4) -> 3
    seq_mask, _ = importance_weights(trainer, sampling, mask, "sequence_mask", None, 3.0)
    assert torch.allclose(seq_mask, torch.tensor([[1.0], [0.0]]))
    assert metrics["importance_sampling/outside_fraction"] == pytest.approx(2 / 5)
    nan_sampling = torch.full((1, 2), float("nan"))
    weights, _ = importance_weights(torch.zeros(1, 2), nan_sampling, torch.ones(1, 2), "token_truncate")
    assert torch.equal(weights, torch.ones(1, 2))  # an unreported log-prob means no correction


# -- vLLM backends, against stand-ins -----------------------------------------------------------------------------


def test_vllm_backend_without_vllm_installed_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'posttrain\[vllm\]'"):
        build_generator(ctx_for(tiny_model_dir, generation_backend="vllm"))


def test_vllm_backend_uses_the_public_weight_transfer_api(tiny_model_dir, monkeypatch, vllm_stand_in):
    """A stand-in vLLM 0.33: the engine is built with the IPC weight-transfer backend and processed log-probs;
    the trainer-side engine pushes the policy's weights through collective_rpc once per step; each prompt's
    SamplingParams carries its seed; the sampled tokens and log-probs flow into the rollout."""
    calls = {"rpc": [], "params": [], "delivered": []}

    class LLM:
        def __init__(self, model, **kwargs):
            calls["init"] = kwargs

        def collective_rpc(self, method, kwargs=None):
            calls["rpc"].append(method)

        def reset_prefix_cache(self):
            pass

        def generate(self, prompts, sampling_params, use_tqdm):
            calls["params"] += sampling_params
            out = types.SimpleNamespace(token_ids=[7, 8, 1], logprobs=[{7: -0.5}, {8: -0.25}, {1: -0.125}])
            return [types.SimpleNamespace(outputs=[out] * p.n) for p in sampling_params]

    class SamplingParams_:
        def __init__(self, n, seed, **kwargs):
            self.n, self.seed, self.kwargs = n, seed, kwargs

    record = {}
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams_))
    vllm_stand_in(calls["delivered"].append, record)
    ctx = ctx_for(tiny_model_dir, generation_backend="vllm", per_prompt_generation=True)
    generator = build_generator(ctx)
    assert calls["init"]["weight_transfer_config"] == {"backend": "ipc"} and generator.reports_logps
    assert calls["init"]["logprobs_mode"] == "processed_logprobs"
    (r,) = sample(generator, ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=4)
    sample(generator, ctx.model, [batch_of(ctx, ["ab", "abcd"])], ctx, num_generations=4)
    assert record["sends"] == 1  # same step: one push
    assert calls["rpc"] == [
        "init_weight_transfer_engine",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
    ]
    pushed = calls["delivered"][0]
    assert set(pushed) == {n for n, _ in ctx.model.named_parameters()} and "lm_head.weight" in pushed
    assert torch.equal(r.completion_ids, torch.tensor([[7, 8, 1]] * 8))
    assert torch.allclose(r.sampling_logps, torch.tensor([[-0.5, -0.25, -0.125]] * 8))
    seeds = [p.seed for p in calls["params"][:2]]
    assert len(set(seeds)) == 2 and calls["params"][0].kwargs["max_tokens"] == 5
    assert calls["params"][0].kwargs["top_k"] == -1 and calls["params"][0].kwargs["logprobs"] == 0


def test_lora_policy_is_pushed_merged_under_base_names(tiny_model_dir):
    """vLLM loads the base architecture: a LoRA policy goes out merged, under the base model's names, and is
    left unmerged afterwards."""
    from peft import LoraConfig, get_peft_model
    from posttrain.generation._vllm import policy_weights

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = {n for n, _ in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(policy_weights(model))
    assert set(pushed) == names
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(pushed[q], expected, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # unmerged again


def test_vllm_backend_refuses_several_processes(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace())
    ctx = ctx_for(tiny_model_dir, generation_backend="vllm")
    ctx.accelerator = types.SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="vllm-server"):
        build_generator(ctx)
