"""posttrain against TRL 1.16 and a bare PyTorch loop: step time, tokens/s, peak RSS, start-up time.

Run from the repository root, in an environment with posttrain, its sft/dpo/reward/grpo plugins and trl==1.16.0
(``nox -s bench`` builds one)::

    python benchmarks/bench.py                      # everything: ~15 min on 2 CPU cores
    python benchmarks/bench.py --sizes tiny --methods sft --repeats tiny=1   # one quick cell

Every timed run is its own subprocess (``bench.py worker ...``), so peak RSS and start-up time are per run. Runs of
posttrain, TRL and the bare loop are interleaved (A B C, B C A, ...) so machine load hits them alike. Step times
come from one global ``torch.optim`` post-step hook: the time between consecutive optimizer steps, whatever the
framework does in between (data, rollout, forward, backward, clipping, logging). The results land in
``benchmarks/results/cpu-<date>.{json,md}`` and ``latest.{json,md}``; README.md explains how to read them.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Llama shapes built from config (character vocabulary of ~100 tokens, untied embeddings).
SIZES = {
    "tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512},
    "small": {"hidden_size": 512, "num_layers": 10, "num_heads": 8, "intermediate_size": 1536},
}
#: Per size and method: micro-batch, accumulation and lengths in tokens. Every row of a workload has the same
#: length, so every micro-batch holds the same tokens whatever order a framework samples rows in.
#: sft: ``seq`` tokens per row (text + EOS). dpo/reward: prompt + completion + EOS per side, two sides per pair.
#: grpo: ``batch`` prompts x ``generations`` completions of exactly ``completion`` tokens (EOS suppressed).
#: dpo-precomputed: dpo with precompute_ref_log_probs (the reference scores every row once, before the first step).
#: grpo-async: a generation-heavy GRPO step run synchronously and with async_generation (max_staleness 1), in one cell.
WORKLOADS = {
    "tiny": {
        "sft": {"batch": 8, "accum": 2, "seq": 128},
        "dpo": {"batch": 4, "accum": 2, "prompt": 32, "completion": 31},
        "dpo-precomputed": {"batch": 4, "accum": 2, "prompt": 32, "completion": 31},
        "reward": {"batch": 4, "accum": 2, "prompt": 32, "completion": 31},
        "grpo": {"batch": 2, "generations": 4, "accum": 2, "prompt": 16, "completion": 16},
        "grpo-long": {"batch": 2, "generations": 4, "accum": 2, "prompt": 16, "completion": 128},
        "grpo-async": {"batch": 2, "generations": 4, "accum": 4, "prompt": 16, "completion": 128},
    },
    "small": {
        "sft": {"batch": 4, "accum": 2, "seq": 64},
        "dpo": {"batch": 2, "accum": 2, "prompt": 16, "completion": 15},
        "dpo-precomputed": {"batch": 2, "accum": 2, "prompt": 16, "completion": 15},
        "reward": {"batch": 2, "accum": 2, "prompt": 16, "completion": 15},
        "grpo": {"batch": 2, "generations": 4, "accum": 1, "prompt": 16, "completion": 16},
        "grpo-long": {"batch": 2, "generations": 4, "accum": 1, "prompt": 16, "completion": 128},
        "grpo-async": {"batch": 2, "generations": 4, "accum": 4, "prompt": 16, "completion": 128},
    },
}
#: Realistic workloads: a 32k-word vocabulary built locally (one token per word), rows of heavy-tailed length
#: (log-normal, clipped), and a model whose LM head is most of its parameters and compute, as in small real models
#: (Qwen2.5-0.5B: 136M of 494M parameters are the head). Lengths are in tokens; "median"/"sigma" are the log-normal's.
REALISTIC_SIZES = {
    "real32k": {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "intermediate_size": 688, "vocab_size": 32000},
    # the GPU workload (--device cuda): a few hundred million parameters, the same 32k vocabulary and length shapes
    "gpu350m": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 2816, "vocab_size": 32000},
}
SIZES.update(REALISTIC_SIZES)
WORKLOADS["real32k"] = {
    # rows of 16..2048 tokens, median 128 (mean ~210; ~0.3% reach the 2048 cap)
    "sft": {"batch": 2, "accum": 2, "max_length": 2048, "text": (128, 1.0, 16, 2048)},
    # pairs share a prompt of 16..1024 tokens (median 64); chosen and rejected 16..1024 (median 64) each
    "dpo": {"batch": 2, "accum": 1, "prompt": (64, 1.0, 16, 1024), "completion": (64, 1.0, 16, 1024)},
    # prompts of 16..512 tokens (median 64), 4 completions of exactly 128 tokens each
    "grpo": {"batch": 2, "generations": 4, "accum": 1, "prompt": (64, 1.0, 16, 512), "completion": 128},
}
#: The GPU workloads: the real32k row shapes, batches large enough to keep an H100-class GPU busy.
WORKLOADS["gpu350m"] = {
    "sft": {"batch": 8, "accum": 2, "max_length": 2048, "text": (128, 1.0, 16, 2048)},
    "dpo": {"batch": 8, "accum": 1, "prompt": (64, 1.0, 16, 1024), "completion": (64, 1.0, 16, 1024)},
    "grpo": {"batch": 4, "generations": 8, "accum": 1, "prompt": (64, 1.0, 16, 512), "completion": 128},
    "grpo-async": {"batch": 4, "generations": 8, "accum": 1, "prompt": (64, 1.0, 16, 512), "completion": 128},
}
#: Dense bf16 peak of the GPU the MFU column divides by (H100/H200 SXM datasheet: 989 TFLOP/s).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LEARNING_RATE, MAX_GRAD_NORM, LOGGING_STEPS, SEED = 1e-5, 1.0, 5, 0
#: grpo-async compares these two runners only: TRL's asynchronous GRPO needs a vLLM server, the bare loop has none.
ASYNC_RUNNERS = ("posttrain", "posttrain-async")
ASYNC_TARGET = 1.4  # completion tokens trained per second, asynchronous over synchronous
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def tokens_per_step(method: str, w: dict) -> int:
    """Tokens one optimizer step processes (no padding exists: every row has the same length); for a realistic
    workload, the mean real (unpadded) tokens per step over its data file, set by ``write_data``."""
    if "tokens_per_step" in w:
        return w["tokens_per_step"]
    method = base_method(method)
    if method == "sft":
        return w["batch"] * w["accum"] * w["seq"]
    if method in ("dpo", "reward"):
        return w["batch"] * w["accum"] * 2 * (w["prompt"] + w["completion"] + 1)
    return w["batch"] * w["generations"] * w["accum"] * (w["prompt"] + w["completion"])


def base_method(method: str) -> str:
    return method.split("-")[0]


# -- workloads ---------------------------------------------------------------------------------------------------


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def is_realistic(size: str) -> bool:
    return size in REALISTIC_SIZES


def word(i: int) -> str:
    """The i-th word of the realistic vocabulary: four lowercase letters, distinct for i < 26**4."""
    return "".join(chr(97 + (i // 26**k) % 26) for k in range(4))


def _length(rng: random.Random, spec: tuple[int, float, int, int]) -> int:
    median, sigma, low, high = spec
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def write_realistic_data(method: str, w: dict, n_steps: int, path: Path, vocab_words: int) -> None:
    """Rows of heavy-tailed length in words of the realistic vocabulary (one token each); sets the workload's
    ``tokens_per_step`` (real tokens, no padding: the mean over the file's steps) and ``longest``."""
    rng = random.Random(SEED)

    def text(n: int) -> str:
        return " ".join(word(rng.randrange(vocab_words)) for _ in range(n))

    per_step = w["batch"] * w["accum"]
    rows, total, longest = [], 0, 0
    for _ in range(per_step * n_steps):
        if method == "sft":
            n = _length(rng, w["text"])
            rows.append({"text": text(n - 1)})  # + EOS = n tokens
            total, longest = total + n, max(longest, n)
        elif method == "dpo":
            p, c, r = _length(rng, w["prompt"]), _length(rng, w["completion"]), _length(rng, w["completion"])
            rows.append({"prompt": text(p), "chosen": text(c - 1), "rejected": text(r - 1)})
            total, longest = total + 2 * p + c + r, max(longest, p + c, p + r)
        else:
            p = _length(rng, w["prompt"])
            rows.append({"prompt": text(p)})
            total += w["generations"] * (p + w["completion"])
            longest = max(longest, p + w["completion"])
    w["tokens_per_step"], w["longest"] = round(total / n_steps), longest
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(method: str, w: dict, n_steps: int, path: Path) -> None:
    """JSONL rows for ``n_steps`` optimizer steps, every row of the same token length (one token per character)."""
    rng = random.Random(SEED)
    method = base_method(method)
    per_step = w["batch"] * w["accum"]
    rows = []
    for _ in range(per_step * n_steps):
        if method == "sft":
            rows.append({"text": _text(rng, w["seq"] - 1)})  # + EOS = seq tokens
        elif method in ("dpo", "reward"):
            rows.append(
                {
                    "prompt": _text(rng, w["prompt"]),
                    "chosen": _text(rng, w["completion"]),
                    "rejected": _text(rng, w["completion"]),
                }
            )
        else:
            rows.append({"prompt": _text(rng, w["prompt"])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def distinct_chars(completions, **kwargs):
    """The benchmark's GRPO reward: share of distinct characters in a completion (cheap, varies per sample)."""
    return [len(set(c)) / max(1, len(c)) for c in completions]


# -- the worker: one timed run in its own process --------------------------------------------------------------


class Probe:
    """Timestamps of every optimizer step (any framework: a global torch.optim post-step hook) and peak RSS."""

    def __init__(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.perf: list[float] = []
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.faults: list[int] = []
        self.sys: list[float] = []
        self.rss_kb = 0
        self.gpu_peak_bytes = 0
        self.cuda = os.environ.get("POSTTRAIN_BENCH_DEVICE") == "cuda" and torch.cuda.is_available()
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        import resource

        if self.cuda:  # kernels run asynchronously: a step ends when the GPU has finished it
            import torch

            torch.cuda.synchronize()
            self.gpu_peak_bytes = max(self.gpu_peak_bytes, torch.cuda.max_memory_allocated())
        self.perf.append(time.perf_counter())
        self.cpu.append(time.process_time())  # all threads of this process: robust to other load on the machine
        self.wall.append(time.time())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.rss_kb = usage.ru_maxrss  # high-water mark up to this step
        self.faults.append(usage.ru_minflt)  # page faults: memory the allocator handed back and takes again
        self.sys.append(usage.ru_stime)


def worker(spec: dict) -> None:
    probe = Probe()  # imports torch: counted in start-up time for every runner alike
    shapes: dict = {}
    runner = spec["runner"]
    if runner.startswith("posttrain"):
        run_posttrain(spec, shapes)
    elif runner.startswith("trl"):
        run_trl(spec, shapes)
    elif is_realistic(spec["size"]):
        run_bare_realistic(spec, shapes)
    else:
        run_bare(spec, shapes)
    import resource

    result = {
        "perf": probe.perf,
        "cpu": probe.cpu,
        "wall": probe.wall,
        "faults": probe.faults,
        "sys": probe.sys,
        "peak_rss_mb": probe.rss_kb / 1024,
        "peak_gpu_mb": probe.gpu_peak_bytes / 2**20,
        "final_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logged_means": shapes.pop("logged_means", {}),
        "first_collate": shapes.pop("_first_collate", None),
        "first_batch_shapes": shapes,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def _record_shapes(shapes: dict, batch: dict) -> dict:
    if not shapes:
        import torch

        # the first batch is collated as the first step starts: with length grouping the first step is the longest
        # (a deliberate out-of-memory check), so the runs' mean over *every* step starts here
        shapes["_first_collate"] = {"perf": time.perf_counter(), "cpu": time.process_time()}
        shapes.update({k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return batch


def run_posttrain(spec: dict, shapes: dict) -> None:
    from posttrain.loop import train

    method_name, w = base_method(spec["method"]), spec["workload"]
    precompute = spec["method"] == "dpo-precomputed"
    common = {
        "model": spec["model"],
        "dataset": spec["data"],
        "output_dir": spec["output_dir"],
        "max_steps": spec["steps"],
        "learning_rate": LEARNING_RATE,
        "max_grad_norm": MAX_GRAD_NORM,
        "per_device_train_batch_size": w["batch"],
        "gradient_accumulation_steps": w["accum"],
        "logging_steps": LOGGING_STEPS,
        "save_steps": 0,
        "disable_progress_bar": True,
        "seed": SEED,
        "torch_compile": spec["runner"] == "posttrain-compile",
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "group_by_length": spec["runner"] == "posttrain-grouped",
        "bf16": spec.get("device") == "cuda",  # autocast to bf16 over float32 weights, as TRL's bf16: true
    }
    rewards = None
    if method_name == "sft":
        from posttrain_sft import SFT as Method
        from posttrain_sft import SFTConfig as Config

        padding_free = spec["runner"] == "posttrain-padding-free"
        config = Config(**common, max_length=w.get("max_length", w.get("seq")), padding_free=padding_free)
    elif method_name == "dpo":
        from posttrain_dpo import DPO as Method
        from posttrain_dpo import DPOConfig as Config

        config = Config(**common, max_length=None, precompute_ref_log_probs=precompute)
    elif method_name == "reward":
        from posttrain_reward import Reward as Method
        from posttrain_reward import RewardConfig as Config

        config = Config(**common, max_length=None)
    else:
        from posttrain_grpo import GRPO as Method
        from posttrain_grpo import GRPOConfig as Config

        common["per_device_train_batch_size"] = w["batch"] * w["generations"]  # counts completions, as in TRL
        config = Config(
            **common,
            num_generations=w["generations"],
            max_completion_length=w["completion"],
            generation_kwargs={"min_new_tokens": w["completion"]},
            reward_funcs=["distinct_chars"],
            # a worker process samples the next step while this one trains; one thread each (--threads)
            async_generation=spec["runner"] == "posttrain-async",
            max_staleness=1,
        )
        rewards = {"distinct_chars": distinct_chars}
    method = Method()
    collate = method.collate
    method.collate = lambda rows, ctx: _record_shapes(shapes, collate(rows, ctx))
    result = train(method, config, rewards=rewards)
    if method_name == "grpo":  # where a step's time goes: sampling, and the trainer's waits in async mode
        logged = [row for row in result.log_history if "loss" in row][1:]  # the first window holds the start-up
        names = ("generation/seconds", "async/trainer_wait_seconds", "async/generator_idle_seconds")
        shapes["logged_means"] = {
            n: statistics.fmean(row[n] for row in logged) for n in names if logged and all(n in row for row in logged)
        }


def run_trl(spec: dict, shapes: dict) -> None:
    import datasets
    import torch
    import trl

    method_name, w = base_method(spec["method"]), spec["workload"]
    precompute = spec["method"] == "dpo-precomputed"
    common = {
        "output_dir": spec["output_dir"],
        "max_steps": spec["steps"],
        "learning_rate": LEARNING_RATE,
        "max_grad_norm": MAX_GRAD_NORM,
        "per_device_train_batch_size": w["batch"],
        "gradient_accumulation_steps": w["accum"],
        "logging_steps": LOGGING_STEPS,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": spec.get("device", "cpu") == "cpu" or not torch.cuda.is_available(),
        "disable_tqdm": True,
        "seed": SEED,
        "model_init_kwargs": {"dtype": torch.float32},
        "gradient_checkpointing": spec["gradient_checkpointing"],  # TRL's default is true; posttrain's false
        "optim": "adamw_torch_fused",  # TRL's default, stated: posttrain uses the fused AdamW kernel too
        # TRL defaults to bf16 autocast, also on CPU; the CPU benchmark is fp32 throughout, the GPU one bf16 autocast
        "bf16": spec.get("device") == "cuda",
        "fp16": False,
    }
    if spec["runner"] == "trl-grouped":  # transformers' LengthGroupedSampler
        common["train_sampling_strategy"] = "group_by_length"
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if method_name == "sft":
        padding_free = spec["runner"] == "trl-padding-free"
        # TRL refuses max_length with padding_free and no packing (it could not enforce it); no row exceeds it here
        max_length = None if padding_free else w.get("max_length", w.get("seq"))
        args = trl.SFTConfig(**common, max_length=max_length, padding_free=padding_free)
        trainer = trl.SFTTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    elif method_name == "dpo":
        args = trl.DPOConfig(**common, max_length=None, precompute_ref_log_probs=precompute)
        trainer = trl.DPOTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    elif method_name == "reward":
        args = trl.RewardConfig(**common, max_length=None)
        trainer = trl.RewardTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        common["per_device_train_batch_size"] = w["batch"] * w["generations"]  # TRL counts completions
        args = trl.GRPOConfig(
            **common,
            num_generations=w["generations"],
            max_completion_length=w["completion"],
            generation_kwargs={"min_new_tokens": w["completion"]},
        )
        trainer = trl.GRPOTrainer(
            model=spec["model"],
            reward_funcs=[distinct_chars],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    collator = trainer.data_collator
    if collator is not None and method_name != "grpo":
        trainer.data_collator = lambda features: _record_shapes(shapes, collator(features))
    trainer.train()


# -- the bare loop: the same model, data and update with nothing around it ---------------------------------------


def run_bare(spec: dict, shapes: dict) -> None:
    """Hand-written eager loop: forward, loss, backward, clip, AdamW, schedule. No logging, no metrics.

    Rows are tokenized up front into fixed-shape tensors and taken in file order. It is the floor a framework's
    per-step cost is compared against ("loop overhead").
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    torch.manual_seed(SEED)
    method_name, w = base_method(spec["method"]), spec["workload"]
    precompute = spec["method"] == "dpo-precomputed"
    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    eos = tok.eos_token_id
    if method_name == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref = None
    if method_name == "dpo" and not precompute:
        ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
    elif precompute:
        ref = model  # before the first step the policy is the reference, as TRL and posttrain use it
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=spec["steps"])

    def ids(text: str) -> list[int]:
        return tok(text).input_ids

    if method_name == "sft":
        data = torch.tensor([[*ids(r["text"]), eos] for r in rows])  # (R, T)
    elif method_name in ("dpo", "reward"):
        prompts = [ids(r["prompt"]) for r in rows]
        chosen = torch.tensor([p + ids(r["chosen"]) + [eos] for p, r in zip(prompts, rows)])  # (R, T)
        rejected = torch.tensor([p + ids(r["rejected"]) + [eos] for p, r in zip(prompts, rows)])
        n_prompt = len(prompts[0])
    else:
        data = torch.tensor([ids(r["prompt"]) for r in rows])  # (R, P)
    if precompute:  # every row scored once by the reference, in micro-batches, then the reference is dropped
        model.eval()
        with torch.no_grad():
            ref_table = torch.cat(
                [
                    _completion_logps(ref(input_ids=x, use_cache=False).logits, x, n_prompt).view(2, -1)
                    for x in (
                        torch.cat([chosen[i : i + w["batch"]], rejected[i : i + w["batch"]]])
                        for i in range(0, len(rows), w["batch"])
                    )
                ],
                dim=1,
            )  # (2, R)
        ref = None
        model.train()
    per_micro = w["batch"]
    for step in range(spec["steps"]):
        for k in range(w["accum"]):
            start = (step * w["accum"] + k) * per_micro
            sl = slice(start, start + per_micro)
            if method_name == "sft":
                x = data[sl]
                logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                (loss / (x[:, 1:].numel() * w["accum"])).backward()
                _record_shapes(shapes, {"input_ids": x})
            elif method_name == "dpo":
                x = torch.cat([chosen[sl], rejected[sl]])  # (2B, T): one forward for both sides
                mask = torch.ones_like(x)
                logps = _completion_logps(model(input_ids=x, attention_mask=mask, use_cache=False).logits, x, n_prompt)
                if precompute:
                    ref_logps = ref_table[:, sl].reshape(-1)
                else:
                    with torch.no_grad():
                        ref_logps = _completion_logps(
                            ref(input_ids=x, attention_mask=mask, use_cache=False).logits, x, n_prompt
                        )
                ratios = (logps - ref_logps).view(2, -1)  # (2, B)
                loss = -F.logsigmoid(0.1 * (ratios[0] - ratios[1])).sum()
                (loss / (per_micro * w["accum"])).backward()
                _record_shapes(shapes, {"input_ids": x})
            elif method_name == "reward":
                x = torch.cat([chosen[sl], rejected[sl]])
                rewards = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits.view(2, -1)
                loss = -F.logsigmoid(rewards[0] - rewards[1]).sum()
                (loss / (per_micro * w["accum"])).backward()
                _record_shapes(shapes, {"input_ids": x})
            else:
                _bare_grpo_micro_step(model, tok, data[sl], w, shapes)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def run_bare_realistic(spec: dict, shapes: dict) -> None:
    """The bare loop on variable-length rows, as it is commonly written: rows tokenized up front and taken in file
    order, each micro-batch right-padded to its longest row (prompts left-padded for generation), the full (B, T, V)
    logits, ``log_softmax`` and ``gather``; forward, loss, backward, clip, AdamW, schedule; nothing else."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    torch.manual_seed(SEED)
    method_name, w = base_method(spec["method"]), spec["workload"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref = None
    if method_name == "dpo":
        ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=spec["steps"])

    def ids(text: str) -> list[int]:
        return tok(text).input_ids

    def right_pad(seqs: list[list[int]], masks: list[list[int]]):
        width = max(map(len, seqs))
        x = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # (B, T)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        return x, attention, loss_mask

    def scored_logps(m, x, attention, loss_mask):
        """(B,) summed log-probs of the loss_mask tokens: full logits, float32 log_softmax, gather."""
        logits = m(input_ids=x, attention_mask=attention, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        return (logp * loss_mask[:, 1:]).sum(-1)

    if method_name == "sft":
        data = [[*ids(r["text"]), eos] for r in rows]
    elif method_name == "dpo":
        data = []
        for r in rows:
            p, c, j = ids(r["prompt"]), [*ids(r["chosen"]), eos], [*ids(r["rejected"]), eos]
            data.append((p + c, [0] * len(p) + [1] * len(c), p + j, [0] * len(p) + [1] * len(j)))
    else:
        data = [ids(r["prompt"]) for r in rows]
    per_micro = w["batch"]
    for step in range(spec["steps"]):
        for k in range(w["accum"]):
            start = (step * w["accum"] + k) * per_micro
            micro = data[start : start + per_micro]
            if method_name == "sft":
                x, attention, loss_mask = right_pad(micro, [[1] * len(s) for s in micro])
                n_tokens = int(loss_mask[:, 1:].sum())
                loss = -scored_logps(model, x, attention, loss_mask).sum()
                (loss / (n_tokens * w["accum"])).backward()
            elif method_name == "dpo":
                seqs = [d[0] for d in micro] + [d[2] for d in micro]  # chosen rows, then rejected rows
                x, attention, loss_mask = right_pad(seqs, [d[1] for d in micro] + [d[3] for d in micro])
                logps = scored_logps(model, x, attention, loss_mask)
                with torch.no_grad():
                    ref_logps = scored_logps(ref, x, attention, loss_mask)
                ratios = (logps - ref_logps).view(2, -1)  # (2, B)
                loss = -F.logsigmoid(0.1 * (ratios[0] - ratios[1])).sum()
                (loss / (per_micro * w["accum"])).backward()
            else:
                _bare_grpo_variable(model, tok, micro, w)
                x = None
            if x is not None:
                _record_shapes(shapes, {"input_ids": x})
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _bare_grpo_variable(model, tok, prompts: list[list[int]], w: dict) -> None:
    """GRPO micro-step on prompts of different lengths: left-padded, G samples of exactly C tokens each."""
    import torch

    g, c = w["generations"], w["completion"]
    width = max(map(len, prompts))
    padded = [[tok.pad_token_id] * (width - len(p)) + p for p in prompts for _ in range(g)]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(g)]
    x, attention = torch.tensor(padded), torch.tensor(mask)  # (N, P)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=attention,
            do_sample=True,
            top_k=0,
            max_new_tokens=c,
            min_new_tokens=c,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )  # (N, P + C)
    model.train()
    completions = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    rewards = torch.tensor(distinct_chars(completions)).view(-1, g)  # (B, G)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    full_mask = torch.cat([attention, torch.ones(out.size(0), c, dtype=attention.dtype)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=out, attention_mask=full_mask, position_ids=position_ids, use_cache=False, logits_to_keep=c + 1
    ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, out[:, -c:, None]).squeeze(-1)  # (N, C)
    ratio = torch.exp(logps - logps.detach())
    loss = -(ratio * advantages[:, None]).sum() / (logps.numel() * w["accum"])
    loss.backward()


def _completion_logps(logits, x, n_prompt: int):
    """Summed log-probs of the tokens after the prompt. (2B,)"""
    import torch

    logp = torch.log_softmax(logits[:, n_prompt - 1 : -1].float(), dim=-1)
    return logp.gather(-1, x[:, n_prompt:, None]).squeeze(-1).sum(-1)


def _bare_grpo_micro_step(model, tok, prompts, w: dict, shapes: dict) -> None:
    """Sample G completions of fixed length per prompt (KV cache), score, group-normalise, one policy forward."""
    import torch

    g, c = w["generations"], w["completion"]
    x = prompts.repeat_interleave(g, dim=0)  # (N, P)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=True,
            top_k=0,  # no top-k filter, as TRL and posttrain sample (transformers' default would be 50)
            max_new_tokens=c,
            min_new_tokens=c,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )  # (N, P + C)
    model.train()
    completions = tok.batch_decode(out[:, x.size(1) :], skip_special_tokens=True)
    rewards = torch.tensor(distinct_chars(completions)).view(-1, g)  # (B, G)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    logits = model(input_ids=out, attention_mask=torch.ones_like(out), use_cache=False, logits_to_keep=c + 1).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, out[:, -c:, None]).squeeze(-1)  # (N, C)
    ratio = torch.exp(logps - logps.detach())
    loss = -(ratio * advantages[:, None]).sum() / (logps.numel() * w["accum"])
    loss.backward()
    _record_shapes(shapes, {"input_ids": out})


# -- orchestration ------------------------------------------------------------------------------------------------


def run_one(spec: dict, threads: int, tmp: Path, timeout: float | None = None) -> dict:
    """One worker subprocess; returns its measurements plus load average, wall time and start-up time.

    ``timeout`` (seconds) stops a run that hangs; it counts as a failed run, so the rest of the report is kept."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    spec = {**spec, "output_dir": str(run_dir / "out"), "result": str(run_dir / "result.json")}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(run_dir / "hf-datasets"),  # every run builds its dataset cache from scratch
        "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"),  # and compiles from scratch (torch_compile runs)
        "HF_HUB_OFFLINE": "1",
        "CI": "1",  # no TRL usage ping
        "POSTTRAIN_EXPERIMENTAL_SILENCE": "1",
        "PYTHONWARNINGS": "ignore",
        "POSTTRAIN_BENCH_DEVICE": spec.get("device", "cpu"),
    }
    load = os.getloadavg()[0]
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        shutil.rmtree(run_dir, ignore_errors=True)
        text = [
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (expired.stdout, expired.stderr)
        ]
        tail = text[0][-1500:] + text[1][-1500:]
        raise RuntimeError(
            f"{spec['runner']} {spec['method']} ({spec['size']}) timed out after {timeout} s:\n{tail}"
        ) from None
    wall = time.time() - t0
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        shutil.rmtree(run_dir, ignore_errors=True)
        raise RuntimeError(f"{spec['runner']} {spec['method']} ({spec['size']}) failed:\n{tail}")
    out = json.loads(Path(spec["result"]).read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    perf, cpu, wall_steps = out.pop("perf"), out.pop("cpu"), out.pop("wall")
    faults, sys_time = out.pop("faults"), out.pop("sys")
    if len(perf) != spec["steps"]:
        raise RuntimeError(f"{spec['runner']} {spec['method']}: {len(perf)} optimizer steps, expected {spec['steps']}")
    intervals = [b - a for a, b in itertools.pairwise(perf)]
    cpu_intervals = [b - a for a, b in itertools.pairwise(cpu)]
    out.update(
        step_times=intervals[spec["warmup"] - 1 :],  # steps warmup+1 .. end
        step_cpu_times=cpu_intervals[spec["warmup"] - 1 :],
        warmup_times=intervals[: spec["warmup"] - 1],
        time_to_first_step=wall_steps[0] - t0,
        cpu_to_first_step=cpu[0],
        step_page_faults=[b - a for a, b in itertools.pairwise(faults)][spec["warmup"] - 1 :],
        step_sys_times=[b - a for a, b in itertools.pairwise(sys_time)][spec["warmup"] - 1 :],
        wall=wall,
        load_avg=load,
    )
    start = out.pop("first_collate")
    if start is not None:  # every step, the first included: from the first collated batch to the last update
        out["all_steps_mean_s"] = (perf[-1] - start["perf"]) / len(perf)
        out["all_steps_mean_cpu_s"] = (cpu[-1] - start["cpu"]) / len(perf)
    return out


def summarise(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["step_times"]]
    cpu = [t for r in runs for t in r["step_cpu_times"]]
    return {
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times),
        "median_step_cpu_s": statistics.median(cpu),
        "per_run_median_step_s": [statistics.median(r["step_times"]) for r in runs],
        "per_run_median_step_cpu_s": [statistics.median(r["step_cpu_times"]) for r in runs],
        "per_run_mean_step_s": [statistics.fmean(r["step_times"]) for r in runs],
        "per_run_mean_step_cpu_s": [statistics.fmean(r["step_cpu_times"]) for r in runs],
        "mean_step_cpu_s": statistics.fmean(cpu),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_gpu_mb": statistics.median(r.get("peak_gpu_mb", 0.0) for r in runs),
        "time_to_first_step_s": statistics.median(r["time_to_first_step"] for r in runs),
        "cpu_to_first_step_s": statistics.median(r["cpu_to_first_step"] for r in runs),
        "per_run_all_steps_mean_cpu_s": [r.get("all_steps_mean_cpu_s") for r in runs],
        "per_run_all_steps_mean_s": [r.get("all_steps_mean_s") for r in runs],
        "load_avg": [round(r["load_avg"], 2) for r in runs],
        "n_steps": len(times),
        "first_batch_shapes": runs[0]["first_batch_shapes"],
        "logged_means": {
            name: statistics.median(r["logged_means"][name] for r in runs)
            for name in runs[0].get("logged_means", {})
            if all(name in r.get("logged_means", {}) for r in runs)
        },
    }


def time_command(cmd: list[str], env: dict, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def fake_plugins(root: Path, n: int) -> None:
    """``n`` installed-looking distributions (dist-info with METADATA and entry points), no code."""
    for i in range(n):
        info = root / f"posttrain_fake{i:02d}-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: posttrain-fake{i:02d}\nVersion: 0.1.0\n"
            f"Summary: Benchmark stand-in method {i}.\nRequires-Dist: posttrain>=1.0,<2\n"
            "Classifier: Development Status :: 3 - Alpha\n"
        )
        (info / "entry_points.txt").write_text(f"[posttrain.methods]\nfake{i:02d} = posttrain_fake{i:02d}:Method\n")


def bench_startup(tmp: Path, repeats: int) -> dict:
    """`posttrain list` with 20 extra (fake) plugins installed vs `python -c "import trl"`."""
    fakes = tmp / "fake-site"
    fake_plugins(fakes, 20)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fakes), os.environ.get("PYTHONPATH")]))}
    listed = subprocess.run(
        [sys.executable, "-m", "posttrain", "list", "--json"], env=env, capture_output=True, text=True
    )
    n_entries = len(json.loads(listed.stdout)) if listed.returncode == 0 else None
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "posttrain list": [sys.executable, "-m", "posttrain", "list"],
        "python -c 'import trl'": [sys.executable, "-c", "import trl"],
    }
    times = {name: [] for name in cmds}
    for _ in range(repeats):  # interleaved
        for name, cmd in cmds.items():
            times[name] += time_command(cmd, env, 1)
    return {
        "plugins_listed": n_entries,
        "fake_plugins": 20,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "all_s": times,
        "load_avg": os.getloadavg()[0],
    }


def build_word_model(size: str, root: Path) -> Path:
    """A Llama with the realistic vocabulary: a word-level tokenizer of ``vocab_size`` entries (the special tokens of
    ``posttrain.testing``'s tokenizer, then the words of :func:`word`), built locally, and a random model."""
    from posttrain.testing import CHAT_TEMPLATE, build_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    s = SIZES[size]
    specials = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [word(i) for i in range(s["vocab_size"] - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=specials[2:5],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    shape = {k: s[k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")}
    return build_tiny_model(root / size, **shape, seed=SEED, tokenizer=tokenizer, max_position_embeddings=4096)


def build_model(size: str, root: Path) -> str:
    from posttrain.testing import build_tiny_model
    from transformers import AutoConfig

    if is_realistic(size):
        path = build_word_model(size, root)
    else:
        shape = {k: v for k, v in SIZES[size].items() if k in ("hidden_size", "num_layers", "num_heads")}
        path = build_tiny_model(root / size, **shape, intermediate_size=SIZES[size]["intermediate_size"])
    config = AutoConfig.from_pretrained(path)
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    SIZES[size]["params"] = layers * per_layer + 2 * vocab * h + h
    SIZES[size]["vocab_size"] = vocab
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small,real32k")
    p.add_argument("--methods", default="sft,dpo,dpo-precomputed,reward,grpo")
    p.add_argument("--runners", default="posttrain,trl,bare", help="also: posttrain-compile (SFT only)")
    p.add_argument("--compile", action="store_true", help="add posttrain with torch_compile: true for SFT")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="every runner recomputes activations (TRL's default)"
    )
    p.add_argument(
        "--best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="realistic SFT also runs each framework at its best documented CPU setting (padding-free)",
    )
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="realistic SFT (posttrain and TRL) and DPO (posttrain) also run with length-grouped sampling (-grouped)",
    )
    p.add_argument("--warmup", default="tiny=3,small=3,real32k=1,gpu350m=2", help="optimizer steps not timed, per size")
    p.add_argument(
        "--steps", default="tiny=15,small=6,real32k=5,gpu350m=8", help="timed optimizer steps per run, per size"
    )
    p.add_argument(
        "--repeats",
        default="tiny=3,small=2,real32k=2,gpu350m=1",
        help="rounds: runs per (size, method, runner), interleaved",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: bf16 autocast on the GPU, posttrain and TRL only (the bare loops are CPU code); "
        "use with --sizes gpu350m",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (1: steadiest on a shared machine)"
    )
    p.add_argument("--startup-repeats", type=int, default=7)
    p.add_argument("--run-timeout", type=float, default=None, help="seconds after which one run counts as failed")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args(argv)
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    runners = args.runners.split(",")
    if args.device == "cuda":
        runners = [r for r in runners if r != "bare"]
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    warmup = {k: int(v) for k, v in (kv.split("=") for kv in args.warmup.split(","))}
    repeats = {k: int(v) for k, v in (kv.split("=") for kv in args.repeats.split(","))}
    started = time.time()

    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        runners = [r for r in runners if r != "trl"]
    import posttrain

    report: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "accelerator": "none (CPU only: no GPU machine was available for this run)"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(),
            "load_avg_start": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl_version,
            "posttrain": posttrain.__version__,
        },
        "settings": {
            "threads": args.threads,
            "warmup": warmup,
            "steps": steps,
            "repeats": repeats,
            "dtype": "float32" if args.device == "cpu" else "bf16 autocast over float32 weights",
            "device": args.device,
            "learning_rate": LEARNING_RATE,
            "logging_steps": LOGGING_STEPS,
            "gradient_checkpointing": args.gradient_checkpointing,
            "optimizer": "AdamW, fused kernel, in every runner",
        },
        "sizes": {},
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        report["startup"] = bench_startup(tmp, args.startup_repeats)
        print(json.dumps(report["startup"]["median_s"]), flush=True)
        for size in sizes:
            model = build_model(size, tmp / "models")
            report["sizes"][size] = SIZES[size]
            for method in methods:
                if method not in WORKLOADS[size]:
                    continue  # realistic workloads: sft, dpo and grpo
                w = dict(WORKLOADS[size][method])
                total = warmup[size] + steps[size]
                data = tmp / f"{size}-{method}.jsonl"
                if is_realistic(size):
                    write_realistic_data(method, w, total, data, SIZES[size]["vocab_size"] - 6)
                else:
                    write_data(method, w, total, data)
                cell_runners = runners + (["posttrain-compile"] if args.compile and method == "sft" else [])
                if is_realistic(size) and method == "sft" and args.best:  # best documented settings, both sides
                    cell_runners += [f"{r}-padding-free" for r in ("posttrain", "trl") if r in runners]
                if is_realistic(size) and method in ("sft", "dpo") and args.group_by_length:
                    # TRL's DPOTrainer cannot: its tokenized rows have no input_ids, which the sampler needs
                    grouped = ("posttrain", "trl") if method == "sft" else ("posttrain",)
                    cell_runners += [f"{r}-grouped" for r in grouped if r in runners]
                cell_runners = [r for r in cell_runners if r != "posttrain-compile" or method == "sft"]
                if method == "grpo-async":
                    cell_runners = list(ASYNC_RUNNERS)
                runs: dict[str, list[dict]] = {r: [] for r in cell_runners}
                for rep in range(repeats[size]):
                    order = cell_runners[rep % len(cell_runners) :] + cell_runners[: rep % len(cell_runners)]
                    for runner in order:
                        spec = {
                            "runner": runner,
                            "method": method,
                            "size": size,
                            "model": model,
                            "data": str(data),
                            "workload": w,
                            "steps": total,
                            "warmup": warmup[size],
                            "gradient_checkpointing": args.gradient_checkpointing,
                            "device": args.device,
                        }
                        try:
                            r = run_one(spec, args.threads, tmp, args.run_timeout)
                        except RuntimeError as error:  # one broken runner does not lose the rest of the report
                            print(error, flush=True)
                            report.setdefault("failures", []).append(str(error)[-2000:])
                            continue
                        runs[runner].append(r)
                        print(
                            f"{size:5} {method:6} {runner:17} median {statistics.median(r['step_times']) * 1e3:8.1f} ms"
                            f" cpu {statistics.median(r['step_cpu_times']) * 1e3:8.1f} ms"
                            f"  rss {r['peak_rss_mb']:7.0f} MB  first step {r['time_to_first_step']:5.1f} s"
                            f"  all steps cpu {r.get('all_steps_mean_cpu_s', float('nan')) * 1e3:8.1f} ms"
                            f"  load {r['load_avg']:.1f}  [{time.time() - started:.0f}s]",
                            flush=True,
                        )
                cell = {runner: summarise(rs) for runner, rs in runs.items() if rs}
                for stats in cell.values():
                    stats["tokens_per_s"] = tokens_per_step(method, w) / stats["median_step_s"]
                report["results"].setdefault(size, {})[method] = {
                    "workload": w,
                    "tokens_per_step": tokens_per_step(method, w),
                    "runners": cell,
                    "ratios": ratios(cell, "mean" if is_realistic(size) else "median"),
                    "realistic": is_realistic(size),
                }
                if method == "grpo-async":
                    report["results"][size][method]["async"] = async_ratio(cell, w)
                cell_report = report["results"][size][method]
                cell_report["targets"] = check_targets(method, cell_report["ratios"], is_realistic(size))
                # the report so far, after every cell: a run cut short keeps what it measured
                report["total_wall_s"] = time.time() - started
                report["machine"]["load_avg_end"] = os.getloadavg()
                write_report(report, Path(args.out), args.tag or "partial", quiet=True)
    report["total_wall_s"] = time.time() - started
    report["machine"]["load_avg_end"] = os.getloadavg()
    write_report(report, Path(args.out), args.tag)
    return 0


#: The issue's targets, as (method or "*", ratio, measure) -> limit. A ratio is posttrain's figure over the other's.
TARGETS = {
    ("sft", "posttrain/bare", "step_cpu"): 1.02,
    ("sft", "posttrain/trl", "step_cpu"): 0.85,
    ("sft", "posttrain-compile/trl", "step_cpu"): 0.7,
    ("dpo", "posttrain/trl", "step_cpu"): 0.75,
    ("dpo-precomputed", "posttrain/trl", "step_cpu"): 0.75,
    ("grpo", "posttrain/trl", "step_cpu"): 0.6,
    ("*", "posttrain/trl", "peak_rss"): 0.8,
    ("*", "posttrain/trl", "first_step_wall"): 0.5,
}


def ratios(cell: dict, statistic: str = "median") -> dict:
    """posttrain / TRL and posttrain / bare for step time, RSS and start-up (below 1: posttrain is better).

    Step-time ratios pair the runs of one round (adjacent in time, so slow drifts of the machine's speed cancel) and
    take the geometric mean over rounds; ``step_cpu_range`` is the lowest and highest per-round ratio. ``statistic``
    is the per-run step time compared: the median, or for realistic workloads (whose steps differ in content, and
    every run trains on the same rows in its own order) the mean over the timed steps.
    """
    out = {}
    others = ("trl", "trl-padding-free", "bare")
    pairs = [(ours, other) for ours in cell if ours.startswith("posttrain") for other in others]
    for ours, other in [*pairs, ("trl", "bare")]:
        if ours not in cell or other not in cell:
            continue
        a, b = cell[ours], cell[other]
        key = f"per_run_{statistic}_step_cpu_s"
        per_round = [x / y for x, y in zip(a[key], b[key])]
        per_round_wall = [x / y for x, y in zip(a[f"per_run_{statistic}_step_s"], b[f"per_run_{statistic}_step_s"])]
        out[f"{ours}/{other}"] = {
            "step_cpu": statistics.geometric_mean(per_round),
            "step_cpu_range": [min(per_round), max(per_round)],
            "step_wall": statistics.geometric_mean(per_round_wall),
            "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
            "first_step_wall": a["time_to_first_step_s"] / b["time_to_first_step_s"],
            "first_step_cpu": a["cpu_to_first_step_s"] / b["cpu_to_first_step_s"],
        }
    return out


def async_ratio(cell: dict, w: dict) -> dict:
    """Completion tokens trained per second, asynchronous over synchronous, from wall-clock step times.

    Wall time, not CPU time: the point is the overlap of two processes, and the trainer's CPU time does not count
    the worker's. Each round's two runs are adjacent in time (interleaved, order rotating), so the ratio is taken
    within a round and the rounds' ratios are averaged (geometric mean), as for the other cells.
    """
    sync, overlapped = cell["posttrain"], cell["posttrain-async"]
    per_round = [s / a for s, a in zip(sync["per_run_median_step_s"], overlapped["per_run_median_step_s"])]
    completion_tokens = w["batch"] * w["generations"] * w["accum"] * w["completion"]
    value = statistics.geometric_mean(per_round)
    return {
        "throughput": value,
        "throughput_range": [min(per_round), max(per_round)],
        "per_round": per_round,
        "completion_tokens_per_step": completion_tokens,
        "completion_tokens_per_s": {r: completion_tokens / cell[r]["median_step_s"] for r in ASYNC_RUNNERS},
        "target": ASYNC_TARGET,
        "met": value >= ASYNC_TARGET,
    }


#: The targets on the realistic workloads (32k vocabulary, heavy-tailed lengths): at defaults and at best settings.
REALISTIC_TARGETS = {
    ("sft", "posttrain/trl", "step_cpu"): 0.6,
    ("dpo", "posttrain/trl", "step_cpu"): 0.6,
    ("grpo", "posttrain/trl", "step_cpu"): 0.6,
    ("sft", "posttrain-padding-free/trl-padding-free", "step_cpu"): 0.9,
    ("*", "posttrain/trl", "peak_rss"): 0.7,
}


def check_targets(method: str, cell_ratios: dict, realistic: bool = False) -> list[dict]:
    found = []
    for (m, pair, measure), limit in (REALISTIC_TARGETS if realistic else TARGETS).items():
        if m in ("*", method) and pair in cell_ratios:
            value = cell_ratios[pair][measure]
            found.append({"ratio": pair, "measure": measure, "value": value, "limit": limit, "met": value <= limit})
    return found


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    models = ", ".join(
        f"{k} = Llama {x['num_layers']} layers x {x['hidden_size']} ({x['params'] / 1e6:.2f}M params)"
        for k, x in report["sizes"].items()
    )
    lines = [
        f"# posttrain vs TRL {v['trl']} vs a bare PyTorch loop, CPU ({report['date'][:10]})",
        "",
        f"- Machine: {m['cpu_count']} CPU cores ({m['processor']}, {m['platform']}).",
        f"- Accelerator: {m['accelerator']}",
        f"- Load average (1 min) at start / end: {m['load_avg_start'][0]:.1f} / {m['load_avg_end'][0]:.1f}; the cores "
        "were shared with other work, so step times are measured in process CPU time (robust to that load) and in "
        "wall time; the load at the start of every run is in the JSON.",
        f"- torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}, posttrain {v['posttrain']}, "
        f"Python {v['python']}; fp32 on CPU, OMP_NUM_THREADS={s['threads']}, fused AdamW everywhere, gradient "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'} everywhere.",
        f"- Models (built from LlamaConfig): {models}. real32k: a word-level tokenizer of 32,000 tokens built "
        "locally; its workloads have heavy-tailed lengths (log-normal, 16-2048 tokens; see benchmarks/README.md).",
        f"- Per cell: {', '.join(f'{k}: {n}' for k, n in s['repeats'].items())} run(s) per framework, interleaved, "
        f"each in its own process; {', '.join(f'{k}: {n}' for k, n in s['warmup'].items())} warm-up optimizer "
        f"steps, then {', '.join(f'{k}: {n}' for k, n in s['steps'].items())} timed steps; medians over all timed "
        "steps (means for real32k, whose steps differ in content).",
        f"- Whole benchmark: {report['total_wall_s'] / 60:.1f} min.",
        "",
        "## Ratios",
        "",
        "posttrain's figure over the other's: below 1 means posttrain is faster or smaller. Step time = median "
        "process CPU time between consecutive optimizer steps; a step ratio is the geometric mean over rounds of "
        "the ratio within a round (runs adjacent in time), the lowest and highest round in brackets, the wall-clock "
        "ratio beside it. Differences within about 10% are machine noise (see the rounds' spread).",
        "",
        "| size | method | vs TRL: step (CPU) | step (wall) | peak RSS | first step | vs bare: step (CPU) "
        "| TRL vs bare (CPU) | targets missed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, methods in report["results"].items():
        for method, cell in methods.items():
            if method == "grpo-async":
                continue  # its own section below
            r = cell["ratios"]
            for ours in [k for k in cell["runners"] if k.startswith("posttrain")]:
                counterpart = "trl-padding-free" if ours == "posttrain-padding-free" else "trl"
                t, b = r.get(f"{ours}/{counterpart}", {}), r.get(f"{ours}/bare", {})
                missed = [
                    f"{x['ratio']} {x['measure']} {x['value']:.2f} > {x['limit']}"
                    for x in cell["targets"]
                    if not x["met"] and x["ratio"].startswith(ours + "/")
                ]
                name = method if ours == "posttrain" else f"{method} ({ours} vs {counterpart})"
                spread = t.get("step_cpu_range")
                spread_text = (
                    f" ({spread[0]:.2f}-{spread[1]:.2f})"
                    if spread and len(cell["runners"][ours]["per_run_median_step_cpu_s"]) > 1
                    else ""
                )
                lines.append(
                    f"| {size} | {name} | **{_f(t.get('step_cpu'))}**{spread_text} | {_f(t.get('step_wall'))} | "
                    f"{_f(t.get('peak_rss'))} | {_f(t.get('first_step_wall'))} | {_f(b.get('step_cpu'))} | "
                    f"{_f(r.get('trl/bare', {}).get('step_cpu')) if ours == 'posttrain' else ''} | "
                    f"{'; '.join(missed) or 'none'} |"
                )
    lines += [
        "",
        "Targets, equal-length workloads (tiny, small): SFT step <= 1.02x bare and <= 0.85x TRL (<= 0.7x TRL with "
        "torch_compile); DPO <= 0.75x TRL; GRPO <= 0.6x TRL; peak RSS <= 0.8x TRL; time to first step <= 0.5x TRL. "
        "Realistic workloads (real32k): SFT, DPO and GRPO step <= 0.6x TRL at defaults; SFT at best settings "
        "(padding-free on both sides) <= 0.9x TRL's best; peak RSS <= 0.7x TRL at defaults.",
        "",
        "## Measurements",
        "",
        "| size | method | workload (tokens/step) | runner | step CPU | step wall | tokens/s (wall) | peak RSS "
        "| first step wall · CPU |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for size, methods in report["results"].items():
        for method, cell in methods.items():
            shape = ", ".join(f"{k} {x}" for k, x in cell["workload"].items()) + f" ({cell['tokens_per_step']})"
            for runner, st in cell["runners"].items():
                lines.append(
                    f"| {size} | {method} | {shape} | {runner} | {st['median_step_cpu_s'] * 1e3:.0f} ms | "
                    f"{st['median_step_s'] * 1e3:.0f} ms | {st['tokens_per_s']:,.0f} | {st['peak_rss_mb']:.0f} MB | "
                    f"{st['time_to_first_step_s']:.1f} s · {st['cpu_to_first_step_s']:.1f} s |"
                )
    lines += async_markdown(report)
    if report.get("failures"):
        lines += ["", "## Failed runs", "", *[f"- `{f.splitlines()[0]}`" for f in report["failures"]]]
    st = report["startup"]
    med = st["median_s"]
    list_ratio = med["posttrain list"] / med["python -c 'import trl'"]
    lines += [
        "",
        f"## Start-up: `posttrain list` with {st['fake_plugins']} extra plugins installed "
        f"({st['plugins_listed']} entries listed) vs `import trl`",
        "",
        "| command | median wall time |",
        "|---|---:|",
        *[f"| `{name}` | {t * 1e3:.0f} ms |" for name, t in med.items()],
        "",
        f"`posttrain list` / `python -c 'import trl'`: **{list_ratio:.2f}**.",
        "",
    ]
    return "\n".join(lines)


def async_markdown(report: dict) -> list[str]:
    """The grpo-async cells: throughput of asynchronous over synchronous GRPO, and where a step's time goes."""
    cells = [
        (size, cell) for size, methods in report["results"].items() for m, cell in methods.items() if m == "grpo-async"
    ]
    if not cells:
        return []
    lines = [
        "## Asynchronous generation (grpo-async)",
        "",
        "GRPO with `async_generation: true, max_staleness: 1` (a worker process samples and scores the next step while "
        "the trainer trains; one torch thread each) over the same run synchronously (one thread). Throughput = "
        "completion tokens trained per second, from wall-clock step times (the overlap of two processes is the "
        "point, and the trainer's CPU time does not count the worker's); the ratio is taken within each round of "
        "interleaved runs and averaged over rounds (geometric mean), lowest and highest round in brackets. Both "
        "runs sample with EOS suppressed, so every completion has exactly the workload's length.",
        "",
        "| size | workload | completion tokens/s sync | async | **async / sync** | target | sampling s/step (sync) "
        "| trainer wait s/step (async) | load (1 min) per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, cell in cells:
        a, w = cell["async"], cell["workload"]
        sync, overlapped = cell["runners"]["posttrain"], cell["runners"]["posttrain-async"]
        shape = f"{w['batch']} prompts x {w['generations']} x {w['accum']} micro-batches, {w['completion']} tokens"
        sampling = sync["logged_means"].get("generation/seconds")
        wait = overlapped["logged_means"].get("async/trainer_wait_seconds")
        loads = " / ".join(f"{x:.1f}" for x in sync["load_avg"] + overlapped["load_avg"])
        lines.append(
            f"| {size} | {shape} | {a['completion_tokens_per_s']['posttrain']:,.0f} | "
            f"{a['completion_tokens_per_s']['posttrain-async']:,.0f} | **{a['throughput']:.2f}** "
            f"({a['throughput_range'][0]:.2f}-{a['throughput_range'][1]:.2f}) | >= {a['target']} "
            f"{'(met)' if a['met'] else '(missed)'} | {_f(sampling * w['accum'] if sampling is not None else None)} | "
            f"{_f(wait)} | {loads} |"
        )
    lines.append("")
    return lines


def training_flops_per_token(size: str) -> float:
    """6 x the parameters a token passes through (every matrix but the input embedding, the LM head included):
    the forward and backward of training, without attention's own length-dependent term."""
    s = SIZES[size]
    return 6 * (s["params"] - s["vocab_size"] * s["hidden_size"])


def gpu_peak_flops(name: str) -> float | None:
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def gpu_markdown(report: dict) -> str:
    """The GPU tables: wall-clock step time, tokens/s, training MFU and peak GPU memory, posttrain beside TRL."""
    m, v, s = report["machine"], report["versions"], report["settings"]
    peak = gpu_peak_flops(m["accelerator"])
    models = ", ".join(
        f"{k} = Llama {x['num_layers']} layers x {x['hidden_size']}, vocabulary {x.get('vocab_size', 'chars')} "
        f"({x['params'] / 1e6:.0f}M params)"
        for k, x in report["sizes"].items()
    )
    lines = [
        f"# posttrain vs TRL {v['trl']} on {m['accelerator']} ({report['date'][:10]})",
        "",
        f"- Machine: {m['accelerator']}, {m['cpu_count']} CPU cores ({m['platform']}).",
        f"- torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}, posttrain {v['posttrain']}, "
        f"Python {v['python']}; {s['dtype']} on both sides, fused AdamW, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'} on both sides, HF generation (no vLLM) for GRPO.",
        f"- Model built from LlamaConfig: {models}; a word-level 32k tokenizer built locally; rows of heavy-tailed "
        "length (log-normal, 16-2048 tokens), as the real32k CPU workload.",
        f"- Per cell: {s['repeats']} run(s) per framework, each in its own process; {s['warmup']} warm-up optimizer "
        f"steps, then {s['steps']} timed steps; mean wall-clock step time (the GPU is synchronised at every step).",
        "- Tokens/s counts real (unpadded) tokens of the step, prompts included. MFU = tokens/s x 6 x the parameters "
        "outside the input embedding (training forward + backward; no attention term, and for DPO and GRPO no "
        "reference or generation FLOPs) / the GPU's dense bf16 peak "
        f"({'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown for this GPU'}).",
        "- Peak GPU memory = `torch.cuda.max_memory_allocated` up to the last optimizer step.",
        f"- Whole benchmark: {report['total_wall_s'] / 60:.1f} min.",
        "",
        "| method | workload (tokens/step) | runner | step (mean) | tokens/s | MFU | peak GPU memory | first step |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ratio_lines = []
    for size, methods in report["results"].items():
        for method, cell in methods.items():
            shape = ", ".join(
                f"{k} {x}" for k, x in cell["workload"].items() if k not in ("longest", "tokens_per_step")
            )
            for runner, st in cell["runners"].items():
                tokens_per_s = cell["tokens_per_step"] / st["mean_step_s"]
                mfu = tokens_per_s * training_flops_per_token(size) / peak if peak else None
                lines.append(
                    f"| {method} | {shape} ({cell['tokens_per_step']}) | {runner} | {st['mean_step_s'] * 1e3:.0f} ms "
                    f"| {tokens_per_s:,.0f} | {f'{mfu:.1%}' if mfu is not None else ''} "
                    f"| {st['peak_gpu_mb'] / 1024:.2f} GiB | {st['time_to_first_step_s']:.1f} s |"
                )
            runners = cell["runners"]
            for ours, other in (("posttrain", "trl"), ("posttrain-padding-free", "trl-padding-free")):
                if ours in runners and other in runners:
                    a, b = runners[ours], runners[other]
                    memory = a["peak_gpu_mb"] / b["peak_gpu_mb"] if b["peak_gpu_mb"] else None
                    ratio_lines.append(
                        f"| {method} | {ours} / {other} | **{a['mean_step_s'] / b['mean_step_s']:.2f}** | "
                        f"{_f(memory)} | {a['time_to_first_step_s'] / b['time_to_first_step_s']:.2f} |"
                    )
            if method == "grpo-async" and "async" in cell:
                a = cell["async"]
                ratio_lines.append(
                    f"| grpo-async | posttrain-async / posttrain (throughput, higher is better) | "
                    f"**{a['throughput']:.2f}** | | |"
                )
    lines += [
        "",
        "## Ratios (below 1: posttrain is faster or smaller)",
        "",
        "| method | ratio | step time | peak GPU memory | time to first step |",
        "|---|---|---:|---:|---:|",
        *ratio_lines,
    ]
    if report.get("failures"):
        lines += ["", "## Failed runs", "", *[f"- `{f.splitlines()[0]}`" for f in report["failures"]]]
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: Path, tag: str, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = report["settings"].get("device", "cpu")
    stem = f"{'cpu' if device == 'cpu' else 'gpu'}-{report['date'][:10]}{f'-{tag}' if tag else ''}"
    text = markdown(report) if device == "cpu" else gpu_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    if not tag and device == "cpu":  # latest.* holds the CPU tables; GPU results keep their own file
        (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "latest.md").write_text(text)
    if not quiet:
        print(text)
        print(f"\nwrote {out / stem}.json and .md")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
