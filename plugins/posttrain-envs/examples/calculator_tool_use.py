"""A tiny model learns to use a calculator: SFT on a few tool-use demonstrations, then GRPO against the
``calculator`` environment. Offline, on a CPU, through the installed plugins (posttrain-sft, posttrain-grpo,
posttrain-envs) exactly as a user's runs would go.

    python plugins/posttrain-envs/examples/calculator_tool_use.py --seeds 0 1 2 --output_dir runs/calculator

The task: two-digit x two-digit products (``"37*48"``), which a model of this size cannot compute in its head
(the baseline stage, the same SFT on the same problems answered directly, measures that). With the tool the
whole job is to copy the operands into a well-formed call, then copy the result into the answer. SFT sees only ``N_DEMONSTRATIONS``
worked conversations (user, a tool call, the tool's result, the answer; loss on the assistant turns only); GRPO
then trains on many more prompts with the environment's reward alone (1.0 for a correct final answer).

Held-out scoring is greedy decoding of whole episodes against the same environment, through core's multi-turn
sampler: accuracy (the environment's ``correct``), the fraction of episodes that made a well-formed tool call,
and ``tools/well_formed_fraction`` (well-formed among attempted calls).

The tokenizer is the test suite's character tokenizer plus the tokens a byte-pair tokenizer would have merged for
a tool call (the tags and the JSON glue: see ``posttrain.testing.environments.TOOL_CALL_TOKENS``), so a call is
~30 tokens, as with a real tokenizer, rather than ~80 characters.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

SPLIT_SEED = 1234  # the held-out set does not move with --seeds
N_HELD_OUT = 200
N_DEMONSTRATIONS = 64  # written demonstrations are the expensive kind of data: SFT gets few
MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
SFT = {
    "learning_rate": 3e-3,  # a tiny random model needs a far larger rate than a pretrained one
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 16,
    "max_length": 128,
    "assistant_only_loss": True,  # the tool's result is the environment's text: no loss on it
    "logging_steps": 25,
}
GRPO = {
    "environment": "calculator",
    "max_turns": 3,  # a call, the answer, one spare
    "max_completion_length": 40,  # per turn: a call is ~30 tokens
    "max_episode_tokens": 96,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 64,  # completions per step: 8 prompts x num_generations
    "num_generations": 8,
    "temperature": 1.0,
    "logging_steps": 10,
}
PLANS = {"full": {"sft_steps": 100, "grpo_steps": 120}, "quick": {"sft_steps": 100, "grpo_steps": 30}}


def problems() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held_out) pairs of two-digit factors; disjoint, the same on every call."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[N_HELD_OUT:], pairs[:N_HELD_OUT]


def prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}*{b}"}]


def sft_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """Conversations with a tool call and its result, and the tools' JSON schemas (SFT renders them in the
    system turn exactly as GRPO's prompts will show them)."""
    from posttrain.environments import ToolCallParser
    from posttrain_envs import calculate
    from transformers.utils import get_json_schema

    call = ToolCallParser().format
    tools = [get_json_schema(calculate)]
    return [
        {
            "messages": [
                *prompt(a, b),
                {"role": "assistant", "content": call("calculate", {"expression": f"{a}*{b}"})},
                {"role": "tool", "name": "calculate", "content": str(a * b)},
                {"role": "assistant", "content": str(a * b)},
            ],
            "tools": tools,
        }
        for a, b in pairs
    ]


def direct_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """The baseline's demonstrations: the same problems answered directly, without the tool."""
    return [{"messages": [*prompt(a, b), {"role": "assistant", "content": str(a * b)}]} for a, b in pairs]


def grpo_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": prompt(a, b), "answer": str(a * b)} for a, b in pairs]


def score(model_dir: Path, held_out: list[tuple[int, int]]) -> dict[str, float]:
    """Episodes on the held-out problems against the calculator environment, through core's sampler: greedy
    (the model's best answer) and sampled at temperature 1 under a fixed seed (the policy GRPO trains)."""
    import datasets
    from posttrain import TrainContext
    from posttrain.generation import OnlineConfig, build_generator, collate_prompts, prepare_prompts, sample
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fields = {k: GRPO[k] for k in ("environment", "max_turns", "max_completion_length", "max_episode_tokens")}
    rows = prepare_prompts(datasets.Dataset.from_list(grpo_rows(held_out)), tokenizer, "score")
    out = {}
    for mode, extra in (("greedy", {"do_sample": False}), ("sampled", None)):
        config = OnlineConfig(model=str(model_dir), generation_kwargs=extra, seed=SPLIT_SEED, **fields)
        ctx = TrainContext(config=config, tokenizer=tokenizer, model=model, training=False)
        (rollout,) = sample(build_generator(ctx), model, [collate_prompts(rows, tokenizer.pad_token_id)], ctx)
        called = [any(m["role"] == "tool" and m.get("name") == "calculate" for m in c) for c in rollout.completions]
        out[mode] = {
            "accuracy": round(_accuracy(rollout), 4),
            "episodes_with_well_formed_call": round(sum(called) / len(called), 4),
            "well_formed_fraction": round(rollout.metrics.get("tools/well_formed_fraction", 0.0), 4),
            "malformed_per_episode": round(rollout.metrics["tools/malformed_calls"], 4),
        }
    return out


def _accuracy(rollout) -> float:
    returns = rollout.columns["episode_return"]  # 1.0 for a correct final answer, 0.0 otherwise
    return sum(returns) / len(returns)


def train_stage(name: str, method, config_class, values: dict, out: Path) -> float:
    import posttrain
    from posttrain.config import build_config

    config = build_config(config_class, {**values, "output_dir": str(out / name), "overwrite_output_dir": True})
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experimental warning of the environment, once per stage
        posttrain.train(method, config)
    return time.perf_counter() - started


def run_seed(seed: int, plan: dict, out: Path) -> dict:
    from posttrain.testing import build_tiny_model
    from posttrain.testing.environments import build_tool_tokenizer
    from posttrain_grpo import GRPO as GRPOMethod
    from posttrain_grpo import GRPOConfig
    from posttrain_sft import SFT as SFTMethod
    from posttrain_sft import SFTConfig

    train_pairs, held_out = problems()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "sft.jsonl", sft_rows(train_pairs[:N_DEMONSTRATIONS]))
    write_jsonl(data / "direct.jsonl", direct_rows(train_pairs[:N_DEMONSTRATIONS]))
    write_jsonl(data / "grpo.jsonl", grpo_rows(train_pairs[N_DEMONSTRATIONS:]))
    base = build_tiny_model(out / "base-model", **MODEL, seed=seed, tokenizer=build_tool_tokenizer())
    common = {"seed": seed, "use_cpu": True, "save_steps": 0, "disable_progress_bar": True}
    result = {"seed": seed, "untrained": score(base, held_out)}
    sft = {**SFT, **common, "model": str(base), "dataset": str(data / "sft.jsonl"), "max_steps": plan["sft_steps"]}
    result["sft_seconds"] = round(train_stage("sft", SFTMethod(), SFTConfig, sft, out), 1)
    result["sft"] = score(out / "sft", held_out)
    # the baseline: the same SFT on the same problems answered in the head, scored the same way
    direct = {**sft, "dataset": str(data / "direct.jsonl")}
    train_stage("sft-no-tool", SFTMethod(), SFTConfig, direct, out)
    result["sft_no_tool"] = score(out / "sft-no-tool", held_out)
    grpo = {
        **GRPO,
        **common,
        "model": str(out / "sft"),
        "dataset": str(data / "grpo.jsonl"),
        "max_steps": plan["grpo_steps"],
    }
    result["grpo_seconds"] = round(train_stage("grpo", GRPOMethod(), GRPOConfig, grpo, out), 1)
    result["grpo"] = score(out / "grpo", held_out)
    return result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/calculator-tool-use"))
    parser.add_argument("--quick", action="store_true", help="shorter stages (a smoke run, not the measurement)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--sft_steps", type=int, help="override the plan's SFT steps")
    parser.add_argument("--grpo_steps", type=int, help="override the plan's GRPO steps")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    plan = dict(PLANS["quick" if args.quick else "full"])
    plan.update({k: v for k, v in (("sft_steps", args.sft_steps), ("grpo_steps", args.grpo_steps)) if v is not None})
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, plan, args.output_dir / f"seed-{seed}"))
        print(json.dumps(results[-1]), flush=True)
    summary = {
        "task": "two-digit x two-digit products with a calculator tool; held-out greedy episodes",
        "plan": plan,
        "model": MODEL,
        "sft": SFT,
        "grpo": GRPO,
        "n_demonstrations": N_DEMONSTRATIONS,
        "held_out": N_HELD_OUT,
        "threads": args.threads,
        "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'seed':>4} {'stage':>11} {'mode':>8} {'accuracy':>9} {'well-formed call':>17} {'malformed/ep':>13}")
    for r in results:
        for stage in ("untrained", "sft_no_tool", "sft", "grpo"):
            for mode, s in r[stage].items():
                print(
                    f"{r['seed']:>4} {stage:>11} {mode:>8} {s['accuracy']:>9.1%} "
                    f"{s['episodes_with_well_formed_call']:>17.1%} {s['malformed_per_episode']:>13.2f}"
                )
    print(f"done in {summary['wall_seconds']} s; summary in {args.output_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
