"""End-to-end checks of the GPU paths, through the CLI as a user runs them: bf16, FSDP2, sharded resume, async GRPO.

Run on a machine with a CUDA GPU (``benchmarks/gpu_run.sh`` calls it); every check is its own ``posttrain train``
process with a timeout, so one failure or hang does not stop the others. Each check prints one line (``ok`` or
``FAILED`` with the tail of the run's output) and the summary is written to ``--out``/``gpu-checks.json``::

    python benchmarks/gpu_checks.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rows(kind: str, n: int = 64) -> list[dict]:
    """Small rows in each method's format (digits and letters of the character tokenizer)."""
    out = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        if kind == "sft":
            out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        elif kind == "dpo":
            out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
        else:
            out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run(name: str, command: list[str], timeout: float, results: list[dict], check=None) -> None:
    """One check: the command must exit 0 (and ``check()`` must return None) within ``timeout`` seconds."""
    t0 = time.time()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as expired:
        text = [
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (expired.stdout, expired.stderr)
        ]
        output, code = "".join(text) + f"\n(timed out after {timeout} s)", None
    problem = None if code == 0 else f"exit code {code}"
    if problem is None and check is not None:
        problem = check()
    seconds = time.time() - t0
    results.append({"check": name, "ok": problem is None, "seconds": round(seconds, 1), "problem": problem})
    print(
        f"{'ok    ' if problem is None else 'FAILED'} {name} ({seconds:.1f} s){'' if problem is None else ': ' + problem}"
    )
    if problem is not None:
        print(output[-3000:])
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--timeout", type=float, default=150, help="seconds per check")
    p.add_argument("--cpu", action="store_true", help="run the same commands on CPU (to check the script itself)")
    args = p.parse_args()
    import torch
    from posttrain.testing import build_tiny_model

    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA device: these checks need a GPU")
        return 2
    work = Path(tempfile.mkdtemp(prefix="posttrain-gpu-checks-"))
    model = str(build_tiny_model(work / "model", hidden_size=64, num_layers=2, num_heads=4))
    data = {k: str(write_jsonl(work / f"{k}.jsonl", rows(k))) for k in ("sft", "dpo", "grpo")}
    cli = [sys.executable, "-m", "posttrain", "train"]
    common = ["--model", model, "--logging_steps", "1", "--per_device_train_batch_size", "8", "--save_steps", "0"]
    if args.cpu:
        common += ["--use_cpu", "true"]
    results: list[dict] = []

    def out(name: str) -> Path:
        return work / name

    def trained(name: str, steps: int):
        def check():
            logged = [m for m in metrics(out(name)) if "loss" in m]
            if len(logged) < steps:
                return f"{len(logged)} logged steps, expected {steps}"
            if not all(abs(m["loss"]) < float("inf") for m in logged):
                return "a non-finite loss"
            return None

        return check

    # bf16 autocast on one GPU, every method family; the checks run at the same time (tiny models, one GPU)
    first: list[tuple] = []
    for method, kind, extra in (
        ("sft", "sft", []),
        ("dpo", "dpo", []),
        ("kto", "dpo", []),
        ("grpo", "grpo", ["--reward_funcs", '["accuracy"]', "--num_generations", "4", "--max_completion_length", "4"]),
        ("rloo", "grpo", ["--reward_funcs", '["accuracy"]', "--num_generations", "4", "--max_completion_length", "4"]),
    ):
        name = f"{method}-bf16"
        command = [*cli, method, *common, "--dataset", data[kind], "--output_dir", str(out(name))]
        first.append((name, [*command, "--bf16", "true", "--max_steps", "3", *extra], trained(name, 3)))

    # FSDP2 through the shipped launch config, on the one GPU (full shard of one process: the wrapping, the
    # sharded state dict and the distributed checkpoint run on NCCL); then resume from its sharded checkpoint
    name = "sft-fsdp2"
    fsdp = [*cli, "sft", *common, "--dataset", data["sft"], "--output_dir", str(out(name)), "--bf16", "true"]
    launcher = ["--accelerate_config", "fsdp2", "--num_processes", "1"]
    first.append((name, [*fsdp, *launcher, "--max_steps", "4", "--save_steps", "2"], trained(name, 4)))
    resumed = [*fsdp, *launcher, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "latest"]
    resumed += ["--resume_override", "max_steps"]
    then = [("sft-fsdp2-resume", resumed, trained(name, 6))]

    # asynchronous GRPO: a generation worker on the same GPU, weights pushed after each optimizer step
    name = "grpo-async"
    command = [*cli, "grpo", *common, "--dataset", data["grpo"], "--output_dir", str(out(name))]
    extra = ["--reward_funcs", '["accuracy"]', "--num_generations", "4", "--max_completion_length", "4"]
    async_fields = ["--async_generation", "true", "--max_staleness", "1", "--max_steps", "4"]
    first.append((name, [*command, *extra, *async_fields], trained(name, 4)))

    for group in (first, then):
        with ThreadPoolExecutor(max_workers=len(group)) as pool:
            for future in [
                pool.submit(run, name, command, args.timeout, results, check) for name, command, check in group
            ]:
                future.result()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    summary = {"device": device, "torch": torch.__version__, "checks": results}
    (Path(args.out) / "gpu-checks.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("POSTTRAIN_EXPERIMENTAL_SILENCE", "1")
    sys.exit(main())
