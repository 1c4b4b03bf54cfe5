"""DPO prompt sharing on CPU: is one prompt forward + two continuations over its cache faster than the usual
concatenated (2B, P + C) batch, on the realistic DPO workload? And is it exact?

Both paths run on posttrain-dpo's collated batches, and both apply the LM head in chunks to
the scored positions only (``posttrain.ops.head_logps``):

- ``concatenated``: one forward of the right-padded (2B, max(P + C)) batch (``posttrain_dpo.method.completion_logps``,
  the default).
- ``shared``: one forward of the B left-padded prompts with ``use_cache=True``, then one forward of the 2B
  right-padded continuations over the prompts' keys and values (:func:`shared_prompt_logps` below; measured, not
  shipped: it was not faster, see docs/benchmarks.md).

Per micro-batch: the policy's forward + backward of the summed log-probs, and a reference forward without gradient
(DPO's step). Model and lengths of ``bench.py``'s real32k DPO workload (Llama 2 x 256, 32k vocabulary; prompts
16-1,024 tokens, median 64; completions 16-1,024, median 64; 2 pairs per micro-batch); one thread; process CPU
time, the two paths interleaved, micro-batch by micro-batch. Also reports the largest difference of the log-probs
and of the gradients between the paths.

    python benchmarks/prompt_sharing.py [--batches 24] [--rounds 2] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def concatenated_logps(model, batch):
    """(2B,) summed completion log-probs from one forward of the concatenated batch (posttrain-dpo's default)."""
    from posttrain_dpo.method import completion_logps

    return completion_logps(model, batch)[0]


def shared_prompt_logps(model, batch: dict):
    """``posttrain_dpo.method.completion_logps`` with each prompt computed once: the same three (2B,) values.

    One forward over the B left-padded prompts with ``use_cache=True`` gives their keys and values and the logits
    of their last token (which score the first completion token); chosen and rejected then run as one (2B, C)
    batch of continuations over the cache (repeated for both sides; the gradient flows through it into the prompt
    forward), positions continuing each prompt, the prompt's padding masked out, and the head applied in chunks to
    the scored positions only. The attention of a completion token sees exactly the keys it sees in the
    concatenated batch, so the result is the same function: log-probs and gradients equal the concatenated path's
    to float32 rounding (float64 with a float64 RMSNorm: 1e-15 relative, :func:`exactness`).
    """
    import torch
    from posttrain.ops import head_logps, hidden_states
    from transformers.cache_utils import DynamicCache

    # every completion has >= 1 token (EOS is appended and prompts reaching max_length are refused in prepare)
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # (2B, T)
    pairs, device = ids.size(0) // 2, ids.device
    prompt_len = (completion.cumsum(-1) == 0).sum(-1)  # (2B,) tokens before the first completion token
    seq_len = attention.sum(-1)  # (2B,)
    width = int(prompt_len[:pairs].max())
    prompt_ids = torch.zeros((pairs, width), dtype=ids.dtype, device=device)  # (B, P), left-padded
    prompt_mask = torch.zeros_like(prompt_ids)
    for j in range(pairs):
        n = int(prompt_len[j])
        prompt_ids[j, width - n :], prompt_mask[j, width - n :] = ids[j, :n], 1
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    last = out.logits[:, -1]  # (B, V): each prompt's last token, at least float32 (mixed precision) for the softmax
    last = last.to(torch.promote_types(last.dtype, torch.float32)).repeat(2, 1)  # (2B, V), for chosen and rejected
    c_width = int((seq_len - prompt_len).max())
    c_ids = torch.zeros((2 * pairs, c_width), dtype=ids.dtype, device=device)  # (2B, C), right-padded
    c_mask = torch.zeros_like(c_ids)
    for i in range(2 * pairs):
        start, end = int(prompt_len[i]), int(seq_len[i])
        c_ids[i, : end - start], c_mask[i, : end - start] = ids[i, start:end], 1
    cache = DynamicCache(
        [(layer.keys.repeat(2, 1, 1, 1), layer.values.repeat(2, 1, 1, 1)) for layer in out.cache.layers]
    )
    hidden, head = hidden_states(
        model,
        input_ids=c_ids,
        attention_mask=torch.cat([prompt_mask.repeat(2, 1), c_mask], 1),  # (2B, P + C)
        position_ids=prompt_len[:, None] + torch.arange(c_width, device=device)[None],
        cache=cache,
    )  # (2B, C, H)
    first = last.log_softmax(-1).gather(1, c_ids[:, :1]).squeeze(1)  # (2B,) the first completion token
    scored = c_mask[:, 1:].bool()  # (2B, C - 1): position k predicts token k + 1
    rows = scored.nonzero(as_tuple=True)[0]
    rest = head_logps(hidden[:, :-1][scored], head, c_ids[:, 1:][scored], mean_logit=True)
    logps = first.to(rest.logps.dtype).index_add(0, rows, rest.logps)
    lengths = c_mask.sum(-1)
    logit_sums = last.mean(-1).detach().float().index_add(0, rows, rest.mean_logit.float())
    return logps, lengths, logit_sums


def shared_logps(model, batch):
    """(2B,) summed completion log-probs, each prompt once."""
    return shared_prompt_logps(model, batch)[0]


def dpo_step(model, path, pairs):
    """Policy forward + backward and a reference forward (the same model, no gradient), as one DPO micro-batch."""
    import torch

    logps = path(model, pairs)
    logps.sum().backward()
    with torch.no_grad():
        path(model, pairs)
    model.zero_grad(set_to_none=True)


def realistic_pairs(n_batches: int, pairs: int, vocab: int, seed: int = 0) -> list[dict]:
    """Collated micro-batches (``posttrain_dpo.data.collate_pairs``) of the real32k DPO workload's lengths."""
    from bench import WORKLOADS, _length
    from posttrain_dpo.data import collate_pairs

    w = WORKLOADS["real32k"]["dpo"]
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(6, vocab) for _ in range(n)]

    def row():
        p, c, r = _length(rng, w["prompt"]), _length(rng, w["completion"]), _length(rng, w["completion"])
        return {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}

    return [collate_pairs([row() for _ in range(pairs)], 0) for _ in range(n_batches)]


def _rms_norm_in_dtype(self, hidden_states):
    """LlamaRMSNorm without its float32 upcast, so a float64 model computes in float64 throughout."""
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exactness(model, batches) -> dict:
    """Largest |difference| of the log-probs and of the gradients between the two paths: float32, and float64 with
    the RMSNorm in float64 too (transformers' LlamaRMSNorm computes in float32 whatever the model's dtype, and the
    shared path sums a prompt token's two gradients before the norm's backward, the concatenated one after: a
    float32 rounding difference that would hide whether the paths are the same function)."""
    import torch
    from transformers.models.llama import modeling_llama

    out = {}
    original = modeling_llama.LlamaRMSNorm.forward
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        modeling_llama.LlamaRMSNorm.forward = _rms_norm_in_dtype if dtype == torch.float64 else original
        diffs, grads, scale = [], [], []
        for pairs in batches[:4]:
            results = []
            for path in (concatenated_logps, shared_logps):
                model.zero_grad(set_to_none=True)
                logps = path(model, pairs)
                logps.sum().backward()
                results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
            (a, ga), (b, gb) = results
            diffs.append((a - b).abs().max().item())
            scale.append(a.abs().max().item())
            grads.append(max(((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item() for x, y in zip(ga, gb)))
        out[str(dtype).removeprefix("torch.")] = {
            "max_abs_logp_diff": max(diffs),
            "largest_abs_logp": max(scale),
            "max_rel_grad_diff": max(grads),
        }
    modeling_llama.LlamaRMSNorm.forward = original
    model.to(torch.float32)
    model.zero_grad(set_to_none=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=24, help="micro-batches per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch (the bench's real32k DPO: 2)")
    p.add_argument("--out", default=str(HERE / "results" / "prompt-sharing.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from bench import build_word_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(build_word_model("real32k", Path(tmp)), dtype=torch.float32)
    model.train()
    batches = realistic_pairs(args.batches, args.pairs, model.config.vocab_size)
    exact = exactness(model, batches)
    print(json.dumps(exact, indent=1), flush=True)
    dpo_step(model, concatenated_logps, batches[0])  # warm-up, both paths
    dpo_step(model, shared_logps, batches[0])
    times: dict[str, list[float]] = {"concatenated": [], "shared": []}
    for round_ in range(args.rounds):
        for k, pairs in enumerate(batches):
            order = [("concatenated", concatenated_logps), ("shared", shared_logps)]
            for name, path in order if (k + round_) % 2 == 0 else order[::-1]:
                t0 = time.process_time()
                dpo_step(model, path, pairs)
                times[name].append(time.process_time() - t0)
    per_round = [
        sum(times["shared"][r * args.batches : (r + 1) * args.batches])
        / sum(times["concatenated"][r * args.batches : (r + 1) * args.batches])
        for r in range(args.rounds)
    ]
    prompt_share = statistics.fmean(
        1 - batch["completion_mask"].sum().item() / batch["attention_mask"].sum().item() for batch in batches
    )  # of the concatenated batch's real tokens, the share that are (repeated) prompt tokens
    report = {
        "batches": args.batches,
        "pairs_per_batch": args.pairs,
        "rounds": args.rounds,
        "mean_cpu_s": {k: statistics.fmean(v) for k, v in times.items()},
        "shared_over_concatenated_per_round": per_round,
        "prompt_share_of_tokens": prompt_share,
        "exactness": exact,
    }
    print(json.dumps(report, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
