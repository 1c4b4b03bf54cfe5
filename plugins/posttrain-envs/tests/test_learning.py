"""A tiny model gets better at using the calculator from GRPO against the environment alone.

The small version of ``examples/calculator_tool_use.py`` (same task, model, data split and stage settings, a
quarter of the GRPO steps): a tiny model is taught the tool-call format by SFT on 64 conversations that hold a
call and its result (through posttrain-sft), then trained with GRPO against the ``calculator`` environment
(reward: a correct final answer) on two-digit products. What RL should raise is measured
without sampling noise: the probability, averaged over the problems, that the policy writes exactly the
perfect episode's turns (the call, then the tool's result as the answer), teacher-forced through the tokens
that core's sampler builds for that episode.
"""

from __future__ import annotations

import random
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from posttrain.environments import ToolCallParser

# Calibration (examples/calibrate_tool_learning.py --seeds 0-2 --threads 1): on one torch thread the rise of
# the perfect-episode probability after GRPO was +0.150, +0.117 and +0.042 for seeds 0, 1 and 2 (after SFT
# 0.475, 0.524 and 0.639: a seed that SFT already taught well has less to gain). Two-thread runs are not yet
# measured (the test pins one thread through conftest). MARGIN sits at half the minimum; a GRPO that does not
# learn from the environment (a sign error, the loss on the tool's tokens, no reward) leaves the probability
# where SFT put it or lowers it.
MARGIN = 0.02
SFT_STEPS, GRPO_STEPS, N_DEMONSTRATIONS, N_HELD_OUT = 150, 30, 64, 64
_PAIRS = [(a, b) for a in range(10, 100) for b in range(10, 100)]
random.Random(1234).shuffle(_PAIRS)  # the example's split: the held-out set is the same for every seed
HELD_OUT, TRAIN = _PAIRS[:N_HELD_OUT], _PAIRS[200:]


def rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in pairs]


def demonstrations() -> list[dict]:
    from posttrain_envs import calculate
    from transformers.utils import get_json_schema

    call = ToolCallParser().format
    return [
        {
            "messages": [
                {"role": "user", "content": f"{a}*{b}"},
                {"role": "assistant", "content": call("calculate", {"expression": f"{a}*{b}"})},
                {"role": "tool", "name": "calculate", "content": str(a * b)},
                {"role": "assistant", "content": str(a * b)},
            ],
            "tools": [get_json_schema(calculate)],
        }
        for a, b in TRAIN[:N_DEMONSTRATIONS]
    ]


def perfect(context: str) -> str:
    result = re.search(r"<\|tool\|>([^<]*)<\|end\|>\s*<\|assistant\|>$", context)
    if result:
        return result.group(1)
    return ToolCallParser().format("calculate", {"expression": re.findall(r"<\|user\|>([^<]*)<\|end\|>", context)[-1]})


def perfect_episode_probability(model_dir: Path) -> float:
    """Mean over the problems of P(the model's turns of the perfect episode), at temperature 1."""
    from posttrain.ops import completion_logps
    from posttrain.testing.environments import play
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rollout, _ = play("calculator", rows(HELD_OUT), perfect, tokenizer=tokenizer, num_generations=1)
    with torch.no_grad():
        logps, _ = completion_logps(model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask.size(1))
    return float((logps * rollout.completion_mask).sum(-1).exp().mean())


def learning_run(seed: int, threads: int = 1) -> dict:
    """SFT then GRPO on a fresh tiny model; the perfect-episode probability after each."""
    import posttrain
    from posttrain.config import build_config
    from posttrain.testing import build_tiny_model
    from posttrain.testing.environments import build_tool_tokenizer
    from posttrain_grpo import GRPO, GRPOConfig
    from posttrain_sft import SFT, SFTConfig

    torch.set_num_threads(threads)
    common = {"seed": seed, "save_steps": 0, "disable_progress_bar": True, "logging_steps": 5, "use_cpu": True}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_tiny_model(Path(tmp, "base"), hidden_size=64, seed=seed, tokenizer=build_tool_tokenizer())
        sft = {"model": str(base), "output_dir": f"{tmp}/sft", "max_steps": SFT_STEPS, "learning_rate": 3e-3}
        sft.update(lr_scheduler_type="constant", per_device_train_batch_size=16, assistant_only_loss=True)
        posttrain.train(SFT(), build_config(SFTConfig, {**sft, **common}), train_dataset=demonstrations())
        before = perfect_episode_probability(Path(tmp, "sft"))
        grpo = {"model": f"{tmp}/sft", "output_dir": f"{tmp}/grpo", "max_steps": GRPO_STEPS, "learning_rate": 1e-3}
        grpo.update(environment="calculator", max_turns=3, max_completion_length=40, num_generations=8)
        grpo.update(max_episode_tokens=96)
        grpo.update(lr_scheduler_type="constant", per_device_train_batch_size=64)
        train = rows(TRAIN[N_DEMONSTRATIONS:])
        posttrain.train(GRPO(), build_config(GRPOConfig, {**grpo, **common}), train_dataset=train)
        after = perfect_episode_probability(Path(tmp, "grpo"))
    return {"seed": seed, "threads": threads, "before": before, "after": after, "rise": after - before}


@pytest.mark.slow
def test_grpo_against_the_calculator_raises_the_perfect_episode_probability():
    result = learning_run(seed=0)
    assert result["rise"] > MARGIN, result
