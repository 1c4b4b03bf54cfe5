"""Padded batches against padding-free rows: forward + backward time of one micro-batch, interleaved rounds.

Run: ``python benchmarks/padding_free.py [--attn sdpa] [--rounds 5]``. A Llama-shaped model built from config
(32k vocabulary, hidden 256, 4 layers), the head applied in chunks (:func:`posttrain.ops.token_stats`), micro-batches
of 8 sequences with three length profiles: heavy-tailed (log-normal, median 128, 16 to 2,048 tokens), uniform
100-128 tokens (today's bench) and equal lengths of 128 (GRPO-like completions). Prints the median step time of each
layout per profile (process CPU time, one thread) and the packed/padded ratio with its spread over rounds; the
figures in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from posttrain.ops import pack_sequences, token_stats


def lengths_for(profile: str, batch: int, generator: torch.Generator) -> list[int]:
    if profile == "heavy_tailed":
        raw = torch.empty(batch).log_normal_(mean=4.85, std=0.9, generator=generator)  # median e^4.85 ~ 128
        return [int(x) for x in raw.clamp(16, 2048)]
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
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, attn {args.attn}, batch {args.batch}")
    for profile in ("heavy_tailed", "uniform_100_128", "equal_128"):
        batches = [lengths_for(profile, args.batch, generator) for _ in range(3)]
        seqs = [[[int(t) for t in torch.randint(1, 32000, (n,), generator=generator)] for n in b] for b in batches]
        step(model, seqs[0], True), step(model, seqs[0], False)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        ratios = []
        for _ in range(args.rounds):
            per = {}
            for packed in (False, True):  # interleaved: both layouts see the same machine load
                per[packed] = sum(step(model, s, packed) for s in seqs)
                times[packed].append(per[packed])
            ratios.append(per[True] / per[False])
        tokens = sum(map(sum, batches))
        padded_tokens = sum(len(b) * max(b) for b in batches)
        print(
            f"{profile:16s} tokens {tokens:6d} padded to {padded_tokens:6d}  padded {statistics.median(times[False]):.3f}s"
            f"  packed {statistics.median(times[True]):.3f}s  packed/padded {statistics.median(ratios):.2f}"
            f" (spread {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
