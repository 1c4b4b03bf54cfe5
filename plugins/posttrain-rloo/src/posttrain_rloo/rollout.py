"""Rollout: sample k completions per prompt, score them with the reward functions, subtract the KL penalty
and build the tensors the loss needs (leave-one-out advantages, masks, old log-probs when reused).

Reward functions are called batch-wise as ``func(prompts, completions, **columns)`` (plus
``completion_ids=`` for functions that declare it or take ``**kwargs``) and return one float or ``None``
per completion. ``None`` means "not applicable": that function then carries no weight for that completion;
a completion no function scores is left out of its group's baseline and gets advantage 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from typing import Any

import torch
from posttrain import ConfigError
from posttrain.ops import token_logps

from posttrain_rloo.loss import kl_penalized_rewards, nanstd, rloo_advantages


# Copied from posttrain_grpo.rollout.RewardError
class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; names the function, prompt and cause."""


# Copied from posttrain_grpo.rollout.resolve_reward_funcs
def resolve_reward_funcs(config: Any, given: dict, method_name: str) -> tuple[list[str], list, torch.Tensor]:
    """(names, functions, weights (K,)) from ``config.reward_funcs`` and the callables the run was given.

    Names the run did not receive (the Python API without ``rewards=``) are resolved through
    ``posttrain._registry.resolve_rewards`` (entry points and ``posttrain_register_rewards`` hooks).
    """
    names = list(config.reward_funcs) or list(given)
    if not names:
        raise ConfigError(
            f"{method_name} needs at least one reward function: set reward_funcs (for example "
            "`--reward_funcs accuracy` with posttrain-rewards installed) or pass rewards={name: func} "
            "to posttrain.loop.train"
        )
    missing = [n for n in names if n not in given]
    if missing:
        from posttrain._registry import resolve_rewards

        given = {**given, **resolve_rewards(missing)}
    weights = config.reward_weights if config.reward_weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(
            f"reward_weights has {len(weights)} values for {len(names)} reward functions "
            f"({', '.join(names)}); give one weight each"
        )
    return names, [given[n] for n in names], torch.tensor(weights, dtype=torch.float32)


# Copied from posttrain_grpo.rollout.generation_seed
def generation_seed(seed: int, mode: str, step: int, row: int) -> int:
    """A seed that depends only on the run seed, train/eval, the step and the dataset row."""
    digest = hashlib.blake2b(f"{seed}:{mode}:{step}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


# Copied from posttrain_grpo.rollout.eos_token_ids
def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus every EOS the model's generation config declares (e.g. end-of-turn)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return [tokenizer.eos_token_id, *[t for t in declared if t != tokenizer.eos_token_id]]


# Copied from posttrain_grpo.rollout.generation_config
def generation_config(config: Any, tokenizer: Any, eos_ids: list[int]):
    """A transformers GenerationConfig from the method config (sampling, KV cache on)."""
    from transformers import GenerationConfig

    kwargs = {
        "max_new_tokens": config.max_completion_length,
        "do_sample": True,
        "use_cache": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_ids,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,  # 0 disables top-k; None would let transformers apply its default of 50
        "min_p": config.min_p,
        "repetition_penalty": config.repetition_penalty,
    }
    kwargs.update(config.generation_kwargs or {})
    return GenerationConfig(**kwargs)


# Copied from posttrain_grpo.rollout._eval_mode
@contextlib.contextmanager
def _eval_mode(model: Any):
    """Generate in eval mode: no dropout, and gradient checkpointing off so the KV cache is used."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Copied from posttrain_grpo.rollout._seeded
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        return contextlib.nullcontext()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    fork = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def scope():
        with fork:
            torch.manual_seed(seed)
            yield

    return scope()


# Copied from posttrain_grpo.rollout.hf_generate
def hf_generate(
    model, prompt_ids: list[list[int]], num_generations: int, gen_config, pad_token_id: int, seeds: list[int] | None
) -> list[list[int]]:
    """Sample ``num_generations`` completions per prompt with ``model.generate``.

    With ``seeds`` (one per prompt) each prompt's group is sampled in its own call under its own seed, so
    a completion depends on (prompt, seed) only, never on the rest of the batch; without, all prompts are
    left-padded into one call. Returns P x G token lists (raw: tokens after EOS are cut later).
    """
    device = next(model.parameters()).device
    calls = [[i] for i in range(len(prompt_ids))] if seeds is not None else [list(range(len(prompt_ids)))]
    out: list[list[int]] = []
    with _eval_mode(model):
        for call in calls:
            rows = [prompt_ids[i] for i in call for _ in range(num_generations)]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            with _seeded(seeds[call[0]] if seeds is not None else None, device):
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
            out.extend(generated[:, width:].tolist())
    return out


# Copied from posttrain_grpo.rollout.completion_tensors
def completion_tensors(completions: list[list[int]], eos_ids: list[int], pad_token_id: int, device):
    """Cut each completion after its first EOS and right-pad.

    Returns:
        completion_ids (N, C) long, completion_mask (N, C) long (1 up to and including the first EOS),
        is_truncated (N,) bool (no EOS within the sampled tokens), lengths (N,) long.
    """
    cut, truncated = [], []
    for ids in completions:
        end = next((j for j, t in enumerate(ids) if t in eos_ids), None)
        cut.append(ids[: end + 1] if end is not None else list(ids))
        truncated.append(end is None)
    width = max(1, max(len(c) for c in cut))
    completion_ids = torch.full((len(cut), width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(cut), width), dtype=torch.long)
    for i, c in enumerate(cut):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = 1
    lengths = torch.tensor([len(c) for c in cut])
    return completion_ids.to(device), completion_mask.to(device), torch.tensor(truncated, device=device), lengths


# Copied from posttrain_grpo.rollout.completion_logps
def completion_logps(
    model, input_ids, attention_mask, completion_width: int, temperature: float, with_entropy: bool = False
):
    """Per-token log-probs of the last ``completion_width`` tokens, at the sampling temperature.

    Args:
        input_ids, attention_mask: (N, P + C) left-padded prompt followed by the right-padded completion.

    Returns:
        (logps (N, C) float32, entropy (N, C) detached or None).
    """
    # logits_to_keep: only the completion positions go through the LM head
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=completion_width + 1
    ).logits[:, :-1]  # (N, C, V)
    logits = logits.float() / temperature
    logps = token_logps(logits, input_ids[:, -completion_width:])
    entropy = None
    if with_entropy:
        with torch.no_grad():
            log_p = torch.log_softmax(logits.detach(), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
    return logps, entropy


# Copied from posttrain_grpo.rollout._accepts
def _accepts(func: Any, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# Copied from posttrain_grpo.rollout.score_completions
def score_completions(
    names, funcs, prompts, completions, columns, completion_ids, row_index, num_generations, step: int = 0
) -> torch.Tensor:
    """Call every reward function on the whole micro-batch.

    Args:
        prompts, completions: N = P x G each (each prompt repeated G times).
        columns: dataset columns, N values each; completion_ids: N token lists.
        row_index: P dataset rows, used to name the prompt of a failing completion.

    Returns:
        (N, K) float32 with NaN where a function returned None.

    Raises:
        RewardError: naming the function, the prompt (its dataset row) and the completion when a
            function raises, returns the wrong number of values, or a value that is not a number.
    """
    out = torch.full((len(completions), len(funcs)), float("nan"))
    for k, (name, func) in enumerate(zip(names, funcs)):
        extra = {"completion_ids": completion_ids} if _accepts(func, "completion_ids") else {}

        def call(sl, _func=func, _extra=extra):
            kw = {c: v[sl] for c, v in columns.items()}
            kw.update({key: v[sl] for key, v in _extra.items()})
            return _func(prompts=prompts[sl], completions=completions[sl], **kw)

        try:
            values = list(call(slice(None)))
        except Exception as exc:
            _raise_for_failing_completion(name, call, len(completions), row_index, num_generations, step, exc)
        if len(values) != len(completions):
            raise RewardError(
                f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                f"completions at step {step}; it must return one float (or None) per completion"
            )
        for j, value in enumerate(values):
            if value is None:
                continue
            try:
                out[j, k] = float(value)
            except (TypeError, ValueError):
                p, g = divmod(j, num_generations)
                raise RewardError(
                    f"reward function {name!r} returned {value!r} for completion {g} of prompt {p} "
                    f"(dataset row {row_index[p]}) at step {step}; rewards must be numbers or None"
                ) from None
    return out


# Copied from posttrain_grpo.rollout._raise_for_failing_completion
def _raise_for_failing_completion(name, call, n, row_index, num_generations, step, exc):
    """Re-run the function one completion at a time to name the one that fails."""
    for j in range(n):
        try:
            call(slice(j, j + 1))
        except Exception as single:
            p, g = divmod(j, num_generations)
            raise RewardError(
                f"reward function {name!r} raised on completion {g} of prompt {p} (dataset row "
                f"{row_index[p]}) at step {step}: {type(single).__name__}: {single}"
            ) from single
    raise RewardError(
        f"reward function {name!r} raised on the batch of {n} completions at step {step} (no single "
        f"completion reproduces it): {type(exc).__name__}: {exc}"
    ) from exc


# Copied from posttrain_grpo.rollout.weighted_rewards
def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k·R_k ignoring None (NaN); NaN where no function scored the completion. (N,)."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


# Copied from posttrain_grpo.rollout.reward_metrics
def reward_metrics(names, rewards_per_func, rewards, lengths, is_truncated) -> dict[str, float]:
    """TRL's reward and completion-length metrics for one micro-batch."""
    metrics = {}
    for k, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, k]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, k]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards).item()
    lengths = lengths.float()
    terminated = lengths[~is_truncated.cpu()]
    metrics.update(
        {
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": is_truncated.float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else 0.0,
        }
    )
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


# Copied from posttrain_grpo.rollout.decode_completions
def decode_completions(tokenizer, completion_ids, completion_mask, prompts) -> list:
    """Completion texts; for conversational prompts, a one-message list ``[{"role": "assistant", ...}]``."""
    texts = [
        tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
        for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())
    ]
    if prompts and isinstance(prompts[0], list):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return texts


def generate_and_score(method, model, batch: dict, ctx, old_logps: bool, ref_model=None) -> dict:
    """One RLOO rollout for a collated micro-batch of prompts (see the module docstring)."""
    from posttrain.models import reference_forward

    config, tok = ctx.config, ctx.tokenizer
    device = batch["prompt_ids"].device
    k = config.num_generations
    prompt_lists = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu())]
    mode = "train" if ctx.training else "eval"
    seeds = (
        [generation_seed(config.seed, mode, ctx.step, r) for r in batch["row_index"]]
        if config.per_prompt_generation
        else None
    )
    if method.vllm is not None:
        raw = method.vllm.generate(model, prompt_lists, k, seeds, ctx.step)
    else:
        raw = hf_generate(model, prompt_lists, k, method.generation_config, tok.pad_token_id, seeds)
    completion_ids, completion_mask, is_truncated, lengths = completion_tensors(
        raw, method.eos_ids, tok.pad_token_id, device
    )
    if config.mask_truncated_completions:
        completion_mask = completion_mask * (~is_truncated).unsqueeze(1).long()

    prompts = [p for p in batch["prompts"] for _ in range(k)]
    columns = {name: [v for v in values for _ in range(k)] for name, values in batch["columns"].items()}
    completions = decode_completions(tok, completion_ids, completion_mask, prompts)
    id_lists = [ids[:n].tolist() for ids, n in zip(completion_ids.cpu(), lengths)]
    rewards_per_func = score_completions(
        method.reward_names,
        method.reward_funcs,
        prompts,
        completions,
        columns,
        id_lists,
        batch["row_index"],
        k,
        ctx.step,
    )
    scores = weighted_rewards(rewards_per_func, method.reward_weights)
    rewards = scores.clamp(*config.reward_clip_range) if config.reward_clip_range else scores

    prompt_ids = batch["prompt_ids"].repeat_interleave(k, dim=0)  # (N, P)
    prompt_mask = batch["prompt_mask"].repeat_interleave(k, dim=0)
    out = {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),  # (N, P + C)
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        "completion_mask": completion_mask,  # (N, C)
    }
    width = completion_ids.size(1)
    metrics = {}
    with _eval_mode(model):
        # the sampling policy's log-probs: for the KL penalty, and as old log-probs when a rollout is reused
        policy_logps = (
            completion_logps(model, out["input_ids"], out["attention_mask"], width, config.temperature)[0]
            if old_logps or config.beta != 0.0
            else None
        )
        if old_logps:
            out["old_logps"] = policy_logps
        if config.beta != 0.0:
            with reference_forward(model, ref_model) as ref:
                ref_logps = completion_logps(ref, out["input_ids"], out["attention_mask"], width, config.temperature)[0]
            rewards, per_token_kl = kl_penalized_rewards(
                rewards.to(device), policy_logps, ref_logps, completion_mask, config.beta
            )
            metrics["kl"] = (per_token_kl.sum() / completion_mask.sum().clamp(min=1)).item()
    advantages, std = rloo_advantages(rewards.cpu(), k, config.normalize_advantages)
    out["advantages"] = advantages.to(device)  # (N,)
    metrics.update(reward_metrics(method.reward_names, rewards_per_func, scores, lengths, is_truncated))
    metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    out["metrics"] = metrics
    return out
