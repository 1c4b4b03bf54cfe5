"""Peak memory and time of one forward + backward through the per-token log-probs: chunked head vs full logits.

Run from the repository root in an environment with posttrain installed::

    python benchmarks/logits_memory.py                       # vocabularies 32k and 128k, 2 x 1024 tokens
    python benchmarks/logits_memory.py --vocab 32000 --tokens 2x2048

Every measurement is its own process, so its peak RSS (``ru_maxrss``) is its own. The figure reported is the peak
during the forward + backward minus the RSS just before it (model, optimizer-free, inputs already built): the memory
the log-prob path itself needs. ``plain`` is what the methods did before: ``model(...).logits`` (B, T, V), then a
float32 ``log_softmax`` and ``gather`` (``posttrain.ops.token_logps``). ``chunked`` is ``posttrain.ops.sequence_logps``
(the head applied in chunks of ``LOGITS_CHUNK_ELEMENTS`` logits, recomputed in backward). Results go to
``benchmarks/results/logits-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(spec: dict) -> dict:
    import torch
    from posttrain import ops
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
        num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    b, t = spec["batch"], spec["seq"]
    ids = torch.randint(0, spec["vocab"], (b, t))
    mask = torch.ones_like(ids)

    def step() -> None:
        if spec["path"] == "chunked":
            logps = ops.sequence_logps(model, ids, mask, mask)[0]
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits, labels = ops.shift_for_causal_lm(logits, ids, mask)
            logps = ops.token_logps(logits, labels).sum(-1)
        logps.sum().backward()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_delta_mb": (peak - before) / 1024, "peak_rss_mb": peak / 1024, "wall_s": wall, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="32000,128000")
    p.add_argument("--tokens", default="2x1024", help="batch x sequence length")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="processes per (vocabulary, path), interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    batch, seq = (int(x) for x in args.tokens.split("x"))
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for vocab in (int(v) for v in args.vocab.split(",")):
        runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
        for rep in range(args.repeats):
            for path in ("plain", "chunked") if rep % 2 == 0 else ("chunked", "plain"):
                spec = {"vocab": vocab, "hidden": args.hidden, "layers": args.layers, "batch": batch, "seq": seq}
                spec["path"] = path
                proc = subprocess.run(
                    [sys.executable, __file__, "worker", json.dumps(spec)], env=env, capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[path].append(r)
                print(vocab, path, r, flush=True)
        row = {"vocab": vocab, "batch": batch, "seq": seq, "logits_mb": batch * seq * vocab * 4 / 2**20}
        for path, rs in runs.items():
            row[path] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            row[path]["all_cpu_s"] = [r["cpu_s"] for r in rs]
        row["memory_ratio"] = row["chunked"]["peak_delta_mb"] / row["plain"]["peak_delta_mb"]
        row["cpu_ratio"] = row["chunked"]["cpu_s"] / row["plain"]["cpu_s"]
        rows.append(row)
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
        "settings": {"hidden": args.hidden, "layers": args.layers, "threads": args.threads, "dtype": "float32"},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logits-memory.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Log-prob path: chunked head vs full logits (one forward + backward, CPU, float32)",
        "",
        f"Llama {args.layers} layers x {args.hidden}, untied head, OMP_NUM_THREADS={args.threads}; peak RSS of the "
        "step minus RSS before it (median of "
        f"{args.repeats} processes per cell, interleaved); load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| vocabulary | tokens | B x T x V logits (fp32) | plain: peak | chunked: peak | memory ratio | plain CPU "
        "| chunked CPU | CPU ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['batch']} x {r['seq']} | {r['logits_mb']:,.0f} MB | "
            f"{r['plain']['peak_delta_mb']:,.0f} MB | {r['chunked']['peak_delta_mb']:,.0f} MB | "
            f"**{r['memory_ratio']:.3f}** | {r['plain']['cpu_s']:.2f} s | {r['chunked']['cpu_s']:.2f} s | "
            f"{r['cpu_ratio']:.2f} |"
        )
    (out / "logits-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
