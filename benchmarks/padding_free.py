"""Padded batches against padding-free rows under dense attention, and the choice ``padding_free: auto`` makes.

Run: ``python benchmarks/padding_free.py [--attn sdpa] [--rounds 3] [--models 4x256,4x512] [--seed 0] [--json F]``;
``--report F [F ...]`` re-reads saved measurements against today's estimate.
Llama-shaped models built from config (32k vocabulary; ``LxH``: L layers of hidden size H, intermediate 2.6875 H,
heads of 64), the head applied in chunks (:func:`posttrain.ops.token_stats`), micro-batches of 8 sequences drawn
from six length profiles (heavy-tailed log-normal, a narrower log-normal, uniform 32-512, one long sequence among
short ones, uniform 100-128, equal 128). Each micro-batch is timed on its own (one forward + backward, process CPU
time, one thread), padded and padding-free interleaved in every round, so the ratio of each micro-batch is
measured under the same load; the spread over rounds is printed with it. Next to each measured ratio: the
estimated one (:func:`posttrain.models._layout_costs`, the model's body only) and the choice of
:func:`posttrain.models.pack_batch` under ``"auto"``. A choice is wrong when the measured ratio, over every round,
is on the other side of 1. The figures in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from posttrain.models import _layout_costs, pack_batch
from posttrain.ops import pack_sequences, token_stats

PROFILES = ("heavy_tailed", "lognormal_narrow", "uniform_32_512", "one_long", "uniform_100_128", "equal_128")


def lengths_for(profile: str, batch: int, generator: torch.Generator) -> list[int]:
    if profile == "heavy_tailed":
        raw = torch.empty(batch).log_normal_(mean=4.85, std=0.9, generator=generator)  # median e^4.85 ~ 128
        return [int(x) for x in raw.clamp(16, 2048)]
    if profile == "lognormal_narrow":
        raw = torch.empty(batch).log_normal_(mean=4.85, std=0.4, generator=generator)
        return [int(x) for x in raw.clamp(16, 2048)]
    if profile == "uniform_32_512":
        return [int(x) for x in torch.randint(32, 513, (batch,), generator=generator)]
    if profile == "one_long":  # short answers and one long document
        return [int(x) for x in torch.randint(64, 129, (batch - 1,), generator=generator)] + [1024]
    if profile == "uniform_100_128":
        return [int(x) for x in torch.randint(100, 129, (batch,), generator=generator)]
    return [128] * batch


def step(model, sequences: list[list[int]], packed: bool) -> float:
    start = time.process_time()  # CPU time of this process: steadier than wall time on a shared machine
    if packed:
        batch = pack_sequences(sequences)
        labels = torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1), value=-100)
        labels = labels.masked_fill(torch.nn.functional.pad(batch["position_ids"][:, 1:] == 0, (0, 1)), -100)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        width = max(map(len, sequences))
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels = torch.nn.functional.pad(ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), (0, 1), value=-100)
        inputs = {"input_ids": ids, "attention_mask": mask}
    out = token_stats(model, labels, **inputs)
    out.logps.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def config_of(shape: str, attn: str = "sdpa"):
    from transformers import LlamaConfig

    layers, hidden = (int(x) for x in shape.split("x"))
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=4096,
        attn_implementation=attn,
    )


def build(shape: str, attn: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config_of(shape, attn))


def report(records: list[dict]) -> int:
    """Print each micro-batch's measured ratio, the estimate and auto's choice (from today's cost model, so saved
    measurements can be re-read with ``--report``); returns the number of wrong choices."""
    wrong = 0
    for shape in dict.fromkeys(r["model"] for r in records):
        config = config_of(shape)
        print(f"model {shape}")
        print(
            f"  {'profile':17s} {'tokens':>6s} {'padded':>6s} {'t_pad':>7s} {'t_packed':>8s} {'measured':>8s}"
            f" {'spread':>11s} {'estimate':>8s} auto  verdict"
        )
        for r in (r for r in records if r["model"] == shape):
            lengths = r["lengths"]
            ratios = [a / b for a, b in zip(r["packed_s"], r["padded_s"])]
            padded_cost, packed_cost = _layout_costs(config, lengths, max(lengths))
            choice = pack_batch(config, "auto", lengths)
            if min(ratios) > 1:
                verdict = "ok" if not choice else "WRONG"
            elif max(ratios) < 1:
                verdict = "ok" if choice else "WRONG"
            else:
                verdict = "tie"  # the rounds disagree on which layout is faster
            wrong += verdict == "WRONG"
            print(
                f"  {r['profile']:17s} {sum(lengths):6d} {len(lengths) * max(lengths):6d}"
                f" {statistics.median(r['padded_s']):6.2f}s {statistics.median(r['packed_s']):7.2f}s"
                f" {statistics.median(ratios):8.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                f" {packed_cost / padded_cost:8.2f} {'pack' if choice else 'pad ':4s}  {verdict}"
            )
    print(f"{len(records)} micro-batches, {wrong} wrong choices")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per-profile", type=int, default=2, help="micro-batches drawn per profile")
    parser.add_argument("--models", default="4x256,4x512")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--seed", type=int, default=0, help="draws the lengths and tokens")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--report", nargs="+", default=None, help="re-read saved measurements (--json files)")
    args = parser.parse_args()
    if args.report:
        report([r for path in args.report for r in json.load(open(path))])
        return
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, attn {args.attn}, batch {args.batch}, "
        f"seed {args.seed}, {args.rounds} rounds"
    )
    records = []
    for shape in args.models.split(","):
        model = build(shape, args.attn)
        print(f"model {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        generator = torch.Generator().manual_seed(args.seed)
        cases = []
        for profile in args.profiles.split(","):
            for _ in range(args.per_profile):
                lengths = lengths_for(profile, args.batch, generator)
                seqs = [[int(t) for t in torch.randint(1, 32000, (n,), generator=generator)] for n in lengths]
                cases.append((profile, lengths, seqs))
        step(model, cases[0][2], True), step(model, cases[0][2], False)  # warm-up
        times = {i: {True: [], False: []} for i in range(len(cases))}
        for r in range(args.rounds):
            for i, (_, _, seqs) in enumerate(cases):
                order = (False, True) if r % 2 == 0 else (True, False)  # interleaved, alternating which goes first
                for packed in order:
                    times[i][packed].append(step(model, seqs, packed))
        for i, (profile, lengths, _) in enumerate(cases):
            records.append(
                {
                    "model": shape,
                    "profile": profile,
                    "lengths": lengths,
                    "padded_s": times[i][False],
                    "packed_s": times[i][True],
                }
            )
        del model
    report(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
