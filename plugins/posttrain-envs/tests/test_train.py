"""GRPO and RLOO train against an environment by name, with no environment code of their own; their losses never
see an environment token."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from posttrain import TrainContext
from posttrain.config import build_config
from posttrain.environments import ToolCallParser
from posttrain.generation import collate_prompts
from posttrain.testing.environments import ScriptedGenerator
from posttrain_grpo import GRPO, GRPOConfig
from posttrain_rloo import RLOO, RLOOConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

ROWS = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in [(12, 34), (56, 78)]]
METHODS = [(GRPO, GRPOConfig), (RLOO, RLOOConfig)]


def use_calculator(context: str) -> str:
    result = re.search(r"<\|tool\|>([^<]*)<\|end\|>\s*<\|assistant\|>$", context)
    if result:
        return result.group(1)
    question = re.findall(r"<\|user\|>([^<]*)<\|end\|>", context)[-1]
    return ToolCallParser().format("calculate", {"expression": question})


def values(model_dir, tmp_path, **extra):
    return {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "environment": "calculator",
        "max_turns": 3,
        "max_completion_length": 8,
        "num_generations": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": True,
        "seed": 0,
        **extra,
    }


@pytest.mark.parametrize(("method_class", "config_class"), METHODS)
def test_trains_against_an_environment_by_name(method_class, config_class, tool_model, tmp_path):
    import posttrain

    config = build_config(config_class, values(tool_model, tmp_path))
    result = posttrain.train(method_class(), config, train_dataset=datasets.Dataset.from_list(ROWS * 2))
    logged = result.log_history[0]
    assert result.global_step == 2 and torch.isfinite(torch.tensor(logged["loss"]))
    for key in ("rewards/calculator/mean", "environment/turns", "tools/malformed_calls", "environment/seconds"):
        assert key in logged, key
    used = json.loads((tmp_path / "run" / "provenance.json").read_text())["plugins_used"]
    assert {"name": "calculator", "kind": "environment", "package": "posttrain-envs"}.items() <= used[-1].items()


@pytest.mark.parametrize(("method_class", "config_class"), METHODS)
def test_the_loss_never_sees_an_environment_token(method_class, config_class, tool_model, tmp_path):
    """Scale and shift the final hidden state at every position predicting an environment token: the method's loss and its
    gradients do not move. The same edit at one model-token position moves the gradients (the check can fail)."""
    config = build_config(config_class, values(tool_model, tmp_path, max_completion_length=40))
    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    model = AutoModelForCausalLM.from_pretrained(tool_model)
    ctx = TrainContext(config=config, tokenizer=tokenizer, model=model, model_path=str(tool_model))
    method = method_class()
    method.setup(ctx)
    method.generator = ScriptedGenerator(tokenizer, use_calculator)  # the model's part, played perfectly
    rows = method.prepare(datasets.Dataset.from_list(ROWS), ctx)
    (batch,) = method.rollout(model, [collate_prompts(rows, tokenizer.pad_token_id)], ctx)
    mask = batch["completion_mask"]  # (N, C)
    attended = batch["attention_mask"][:, -mask.size(1) :]
    assert (attended.bool() & ~mask.bool()).any(), "the episodes hold environment tokens"
    assert int(mask.sum()) == sum(len(tokenizer(use_calculator_turns(r)).input_ids) for r in ROWS for _ in (0, 1))
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25, -2.0])  # the scripted episodes all score alike

    def loss_and_grads(edit):
        handle = None
        if edit is not None:
            # the final hidden states feed the head position by position (the head runs in chunks, so no logits
            # tensor exists to edit): position T - C - 1 + j predicts completion token j
            def hook(module, args, hidden):
                change = torch.zeros_like(hidden, dtype=torch.bool)
                start = hidden.size(1) - mask.size(1) - 1
                change[:, start : start + mask.size(1)] = edit.unsqueeze(-1)
                return torch.where(change, hidden * 3.0 + 7.0, hidden)

            handle = model.get_decoder().norm.register_forward_hook(hook)
        model.zero_grad()
        out = method.loss(model, batch, ctx)
        out.loss_sum.backward()
        if handle:
            handle.remove()
        assert int(out.n_items) == int(mask.sum()) or int(out.n_items) == mask.size(0)
        return out.loss_sum.detach(), [p.grad.clone() for p in model.parameters()]

    base, base_grads = loss_and_grads(None)
    perturbed, grads = loss_and_grads(~mask.bool())
    assert torch.equal(base, perturbed) and all(torch.equal(a, b) for a, b in zip(base_grads, grads))
    one = torch.zeros_like(mask, dtype=torch.bool)
    one[0, 0] = True
    moved = loss_and_grads(one)[1]  # on-policy the loss value is -mean(A) whatever the logits; gradients move
    assert not all(torch.equal(a, b) for a, b in zip(base_grads, moved))


def use_calculator_turns(row: dict) -> str:
    """The model's tokens of a perfectly played episode: the call and its end of turn, the answer and its end."""
    question = row["prompt"][0]["content"]
    return use_calculator(f"<|user|>{question}<|end|>") + "<|end|>" + row["answer"] + "<|end|>"


@pytest.mark.parametrize(("name", "config_class"), [("calculator", GRPOConfig), ("guess-number", RLOOConfig)])
def test_shipped_configs_load(name, config_class):
    from pathlib import Path

    from posttrain.config import load_config

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    config = load_config(config_class, path)
    assert config.environment == name and (Path(__file__).parents[3] / config.dataset).is_file()
