"""Generation as a core service: sample completions for online methods, keep the generator in sync, score them.

An online method (GRPO, RLOO, online DPO, distillation) asks for completions; it does not know which
backend made them::

    generator = build_generator(ctx, num_generations=8, rewards=reward_set)  # in setup(), from the config
    rollouts = sample(generator, model, batches, ctx, num_generations=8, rewards=reward_set)
    for r in rollouts:                                  # one per micro-batch of the optimizer step
        r.input_ids, r.completion_mask, r.rewards, r.sampling_logps ...

Backends (``generation_backend`` in :class:`OnlineConfig`):

- ``hf``: transformers ``generate`` with the KV cache on the policy being trained, batched: every
  micro-batch of an optimizer step in one call (``generation_batch_size`` caps a call). Nothing to sync.
- ``vllm``: a vLLM engine in this process, sharing the GPU (``vllm_gpu_memory_utilization``, sleep/wake
  with ``vllm_enable_sleep_mode``); weights pushed through vLLM's weight-transfer API (IPC backend).
- ``vllm-server``: a stock ``vllm serve`` on other GPUs or nodes, driven over HTTP (``/v1/completions``),
  weights sent with vLLM's NCCL weight-transfer engine. ``posttrain vllm-serve-command`` prints the command.

Prompts with images (vision-language models): :func:`prepare_prompts` tokenizes them with the processor, the
generator receives each prompt's images (:class:`PromptImages`), and each :class:`Rollout` carries the image inputs
its loss forward needs (``model_inputs``). The ``hf`` backend passes them to ``generate``; ``vllm`` sends them as
``multi_modal_data`` (not tested here); ``vllm-server`` refuses them (``/v1/completions`` carries no images).

Weights are pushed at most once per optimizer step, before the step's first generation. With
``async_generation: true`` the next steps' batches are sampled and scored while the trainer trains: by a worker
process (``hf``) or by a thread that drives the server (``vllm-server``); ``max_staleness`` fixes how many optimizer
steps old the sampling weights are (see ``posttrain.generation._async`` and docs/async-generation.md). Backends that
report their own log-probs (vLLM) enable importance-sampling correction by default
(:func:`importance_weights`): the loss is reweighted by π_trainer / π_generator, truncated at
``importance_sampling_cap``, because the two engines' numerics differ.

.. versionadded:: 1.0
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from posttrain.config import TrainingConfig
from posttrain.generation._async import GenerationWorkerError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from posttrain._method import TrainContext
    from posttrain.rewards import RewardSet

__all__ = [
    "Completions",
    "GenerationWorkerError",
    "Generator",
    "OnlineConfig",
    "PromptImages",
    "Rollout",
    "SamplingParams",
    "build_generator",
    "collate_prompts",
    "eos_token_ids",
    "generation_seed",
    "importance_weights",
    "prepare_prompts",
    "sample",
]

Backend = Literal["hf", "vllm", "vllm-server"]
ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@dataclass
class OnlineConfig(TrainingConfig):
    """Fields every online method shares: sampling, the generation backend, importance sampling.

    A method's config extends it (``class GRPOConfig(OnlineConfig)``) and adds its own fields.

    .. versionadded:: 1.0
    """

    # -- sampling
    max_completion_length: int = 256  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    top_p: float = 1.0  # nucleus sampling (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    min_p: float | None = None  # minimum token probability relative to the most likely one
    repetition_penalty: float = 1.0  # 1.0 disables it
    generation_kwargs: dict | None = None  # extra transformers GenerationConfig / vLLM SamplingParams fields
    per_prompt_generation: bool = (
        False  # sample each prompt under its own seed (seed, step, row): batch-independent, slower
    )
    # -- backend
    generation_backend: Backend = "hf"  # hf (transformers generate), vllm (in-process), vllm-server (HTTP)
    generation_batch_size: int | None = None  # sequences per generate call at most; None: the whole step at once
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory the in-process vLLM engine may take
    vllm_max_model_length: int | None = None  # vLLM context length; None -> the model's
    vllm_enable_sleep_mode: bool = False  # free vLLM's memory while training, wake it to generate
    vllm_server_url: str = "http://127.0.0.1:8000"  # base URL of `vllm serve` (vllm-server backend)
    vllm_server_timeout: float = 240.0  # seconds to wait for the server to answer /health at start
    # -- off-policy correction (TRL: vllm_importance_sampling_correction / _mode / _cap)
    importance_sampling_correction: bool | None = None  # None: on when the backend's log-probs differ (vllm*)
    importance_sampling_mode: ISMode = "sequence_mask"  # per token or per sequence; clip to the bounds or mask
    importance_sampling_clip_max: float | None = 3.0  # upper bound C_max of π_trainer / π_generator
    importance_sampling_clip_min: float | None = None  # lower bound C_min (None: no lower bound)
    # -- environments: multi-turn episodes with tools (posttrain.environments; docs/environments.md)
    environment: str | None = None  # a posttrain.environments name: sample episodes instead of single completions
    environment_kwargs: dict | None = None  # keyword arguments of the environment's constructor
    max_turns: int = 4  # model turns per episode at most (max_completion_length applies to each turn)
    max_episode_tokens: int | None = None  # model + environment tokens per episode at most; None: no limit
    environment_timeout: float = 60.0  # seconds one reset or step may take before the run stops with an error
    environment_reward_weight: float = 1.0  # weight of the episode return among the reward functions
    # -- asynchronous generation (docs/async-generation.md)
    async_generation: bool = False  # sample and score the next batches while training (hf or vllm-server backend)
    max_staleness: int = 1  # optimizer steps between the sampling weights and the step that trains on them
    async_generation_timeout: float = 600.0  # seconds without progress from the worker or server before the run stops

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_completion_length < 1:
            found.append(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not self.temperature > 0:
            found.append(f"temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            found.append(f"min_p must be in [0, 1] or null, got {self.min_p}")
        if not self.repetition_penalty > 0:
            found.append(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            found.append(f"generation_batch_size must be >= 1 or null, got {self.generation_batch_size}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            found.append(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        lo, hi = self.importance_sampling_clip_min, self.importance_sampling_clip_max
        if (
            (lo is not None and lo < 0)
            or (hi is not None and hi <= 0)
            or (lo is not None and hi is not None and lo > hi)
        ):
            found.append(f"importance_sampling_clip_min/_max must satisfy 0 <= min <= max (max > 0), got {lo} and {hi}")
        if not self.vllm_server_timeout > 0:
            found.append(f"vllm_server_timeout must be > 0 seconds, got {self.vllm_server_timeout}")
        if self.max_staleness < 0:
            found.append(f"max_staleness must be >= 0 (0: the synchronous algorithm), got {self.max_staleness}")
        if not self.async_generation_timeout > 0:
            found.append(f"async_generation_timeout must be > 0 seconds, got {self.async_generation_timeout}")
        if self.async_generation and self.generation_backend == "vllm":
            found.append(
                "async_generation cannot run with generation_backend 'vllm': the in-process engine shares the "
                "training process and its GPU, so it cannot sample while the trainer trains, nor hold older weights "
                "than the policy. Use generation_backend vllm-server (a `vllm serve` on other GPUs, sampled from a "
                "thread while training) or hf (a worker process), or set async_generation false"
            )
        if self.async_generation and self.environment:
            found.append("async_generation does not run multi-turn environments yet; set async_generation false")
        return found + _environment_problems(self)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, backend-neutral. ``stop_token_ids`` end a completion (kept as its last token).

    .. versionadded:: 1.0
    """

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: OnlineConfig, tokenizer: Any, model: Any = None) -> SamplingParams:
        return cls(
            max_new_tokens=config.max_completion_length,
            stop_token_ids=tuple(eos_token_ids(model, tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            min_p=config.min_p,
            repetition_penalty=config.repetition_penalty,
            extra=dict(config.generation_kwargs or {}),
        )


@dataclass
class Completions:
    """What a backend returns for P prompts x n samples (N rows, each prompt's samples consecutive).

    Attributes:
        token_ids: N token lists, cut after the first stop token (which is kept).
        truncated: N flags: no stop token within ``max_new_tokens``.
        logps: N lists of the generator's own log-prob of each token at the sampling temperature, or None
            when the backend does not report them.
        seconds: wall time of the call.

    .. versionadded:: 1.0
    """

    token_ids: list[list[int]]
    truncated: list[bool]
    logps: list[list[float]] | None = None
    seconds: float = 0.0


@dataclass
class PromptImages:
    """The images of one prompt, for a vision-language model's generator.

    Attributes:
        images: the prompt's image values, in order (paths, bytes or PIL images; see :mod:`posttrain.vision`).
        token_inputs: the processor's inputs aligned with the prompt's tokens (``mm_token_type_ids``), unpadded.

    .. versionadded:: 1.0
    """

    images: list
    token_inputs: dict[str, list[int]] = field(default_factory=dict)


class Generator(Protocol):
    """A generation backend. Built by :func:`build_generator`; methods only call :func:`sample`.

    ``generate`` receives ``images`` (one :class:`PromptImages` or None per prompt) only when a prompt has images,
    so a text-only backend may leave the argument out.

    .. versionadded:: 1.0
    """

    name: str
    reports_logps: bool  # whether Completions.logps is filled (and may differ from the trainer's)

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        seeds: list[int] | None = None,
        images: list[PromptImages | None] | None = None,
    ) -> Completions: ...

    def sync_weights(self, model: Any) -> None: ...

    def close(self) -> None: ...


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus every EOS the model's generation config declares (e.g. end-of-turn).

    .. versionadded:: 1.0
    """
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return [tokenizer.eos_token_id, *[t for t in declared if t != tokenizer.eos_token_id]]


def generation_seed(seed: int, mode: str, step: int, row: int) -> int:
    """A seed that depends only on the run seed, train/eval, the step and the dataset row.

    .. versionadded:: 1.0
    """
    digest = hashlib.blake2b(f"{seed}:{mode}:{step}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def build_generator(
    ctx: TrainContext,
    params: SamplingParams | None = None,
    *,
    num_generations: int | None = None,
    rewards: RewardSet | None = None,
) -> Generator:
    """The backend ``ctx.config.generation_backend`` names, ready to sample from the policy ``ctx.model``.

    With ``async_generation: true`` this is the asynchronous service: it samples and scores ahead of the
    method's calls to :func:`sample`, so it needs to know now what those calls will ask for.

    Args:
        ctx: the run's context (config, tokenizer, policy).
        params: sampling settings; default :meth:`SamplingParams.from_config`.
        num_generations: what the method will pass to :func:`sample` when training. A method that passes it
            supports ``async_generation`` (the service checks every call against it); one that does not gets a
            ConfigError when the option is on.
        rewards: the reward set the method will pass to :func:`sample` (scored ahead when asynchronous).

    Raises:
        ConfigError: the backend cannot run here (vLLM not installed, several processes for the in-process
            engine, the server unreachable ...), the ``environment`` does not fit its options, or
            ``async_generation`` is on for a method that does not declare what it samples, saying what to change.
        PluginError: no installed package or hook provides the ``environment``.

    .. versionadded:: 1.0
    """
    config = ctx.config
    if getattr(config, "environment", None):  # resolve and check it now, before any step runs
        from posttrain.generation._episodes import environment_for

        environment_for(ctx)
    params = params or SamplingParams.from_config(config, ctx.tokenizer, ctx.model)
    backend = config.generation_backend
    if getattr(config, "async_generation", False):
        from posttrain._errors import ConfigError
        from posttrain.generation._async import AsyncGenerator

        if num_generations is None:
            raise ConfigError(
                [
                    "async_generation: true, but this method builds its generator without saying what it samples "
                    "(build_generator(ctx, num_generations=..., rewards=...)), so a worker cannot sample ahead for "
                    "it; it does not support asynchronous generation. Set async_generation false"
                ]
            )
        return AsyncGenerator(ctx, params, num_generations, rewards)
    if backend == "hf":
        from posttrain.generation._hf import HFGenerator

        return HFGenerator(ctx.model, params, config.generation_batch_size, processor=ctx.processor)
    if backend == "vllm":
        from posttrain.generation._vllm import VLLMGenerator

        return VLLMGenerator(ctx, params)
    from posttrain.generation._vllm_server import VLLMServerGenerator

    return VLLMServerGenerator(ctx, params)


def _environment_problems(config: OnlineConfig) -> list[str]:
    found = []
    name = config.environment
    if name is not None and not re.match(r"^([A-Za-z0-9_.-]+:)?[a-z][a-z0-9_-]*$", name):
        found.append(f"environment must be an environment name such as 'calculator' (or 'package:name'), got {name!r}")
    if name is None and config.environment_kwargs:
        found.append("environment_kwargs is set but environment is not; name the environment, or drop the kwargs")
    if config.max_turns < 1:
        found.append(f"max_turns must be >= 1, got {config.max_turns}")
    if config.max_episode_tokens is not None and config.max_episode_tokens < 1:
        found.append(f"max_episode_tokens must be >= 1 or null, got {config.max_episode_tokens}")
    if not config.environment_timeout > 0:
        found.append(f"environment_timeout must be > 0 seconds, got {config.environment_timeout}")
    return found


# -- prompt-only data -------------------------------------------------------------------------------------


def prepare_prompts(dataset: Any, tokenizer: Any, method: str, processor: Any = None) -> list[dict]:
    """Prompt rows for sampling: ``{"prompt_ids", "prompt", "columns", "index"}``, validated and tokenized once.

    Conversational prompts are rendered with the chat template and its generation prompt, then tokenized
    without extra special tokens (the template has them); standard prompts are tokenized as they are.
    Every column other than ``prompt`` travels with the row (reward functions receive it). A row with images is
    tokenized by ``processor`` (each image's tokens expanded) and also holds ``images`` and ``token_inputs``.

    Raises:
        DataError: carrying every bad row (missing or empty prompts, prompts that tokenize to nothing, images
            that do not match their placeholders).

    .. versionadded:: 1.0
    """
    from posttrain._errors import ConfigError, DataError, RowProblem
    from posttrain.data import apply_chat_template, is_conversational, validate
    from posttrain.vision import encode, has_images, image_problems, row_images

    problems = validate(dataset, ("prompt_only",))
    with_images = has_images(dataset)
    if with_images and processor is None:
        raise ConfigError(
            f"{method}: the dataset has prompts with images but no processor was given, so the images would be "
            "ignored. Pass the vision-language model's processor (the loop puts it in ctx.processor)."
        )
    if with_images and not problems:
        token = getattr(processor, "image_token", None)
        problems = [
            q
            for i, row in enumerate(dataset)
            if not is_conversational(row)
            for q in image_problems(row, i, token, open_files=False)
        ]
    if problems:
        raise DataError(problems, method=method)
    rows = []
    for index, row in enumerate(dataset):
        prompt = row["prompt"]
        images = row_images(row) if with_images else []
        extra: dict = {}
        if images:
            encoded = encode(processor, prompt, images, add_generation_prompt=True)
            ids = encoded["input_ids"]
            extra = {"images": images, "token_inputs": encoded["token_inputs"]}
        elif is_conversational({"prompt": prompt}):
            ids = tokenizer(
                apply_chat_template(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False
            )
            ids = ids.input_ids
        else:
            ids = tokenizer(prompt).input_ids
        if not ids:
            problems.append(RowProblem(index, "prompt", f"tokenizes to no tokens ({prompt!r})", "Fill in the prompt."))
            continue
        columns = {k: v for k, v in row.items() if k != "prompt"}
        rows.append({"prompt_ids": ids, "prompt": prompt, "columns": columns, "index": index, **extra})
    if problems:
        raise DataError(problems, method=method)
    return rows


def collate_prompts(rows: list[dict], pad_token_id: int) -> dict:
    """A micro-batch of prompts: ``prompt_ids`` (B, P) left-padded, ``prompt_mask`` (B, P), and the lists
    ``prompts``, ``columns`` (name -> B values), ``row_index`` (dataset rows). Prompts with images add
    ``prompt_images`` (one :class:`PromptImages` or None per row); :func:`sample` hands them to the generator.

    .. versionadded:: 1.0
    """
    import torch

    width = max(len(r["prompt_ids"]) for r in rows)
    prompt_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        prompt_ids[i, width - n :] = torch.tensor(r["prompt_ids"])
        prompt_mask[i, width - n :] = 1
    names = list(dict.fromkeys(name for r in rows for name in r["columns"]))
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "prompts": [r["prompt"] for r in rows],
        "columns": {name: [r["columns"].get(name) for r in rows] for name in names},
        "row_index": [r["index"] for r in rows],
    }
    if any(r.get("images") for r in rows):
        batch["prompt_images"] = [
            PromptImages(list(r["images"]), dict(r.get("token_inputs", {}))) if r.get("images") else None for r in rows
        ]
    return batch


# -- sampling and scoring ---------------------------------------------------------------------------------


@dataclass
class Rollout:
    """The sampled, decoded and scored completions of one micro-batch of prompts (N = prompts x n).

    Tensors are on the micro-batch's device. ``input_ids``/``attention_mask`` are the left-padded prompt
    followed by the right-padded completion, ready for :func:`posttrain.ops.completion_logps`; for prompts with
    images, pass it ``model_inputs`` too (the pixel values of each of the N rows and the token-aligned inputs).

    With an ``environment`` (multi-turn episodes) the completion is the whole episode after the prompt: the
    model's turns and the environment's observations, interleaved. ``completion_mask`` covers exactly the
    model's tokens (the loss never sees an environment token) while ``attention_mask`` covers both (the model
    reads the observations); ``rewards`` include the episode return, and ``turn_rewards``/``turn_index`` give
    per-turn rewards for methods that assign credit per turn (:func:`posttrain.environments.returns_to_go`).

    .. versionadded:: 1.0
    """

    prompt_ids: torch.Tensor  # (N, P) each prompt repeated n times
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the stop token
    is_truncated: torch.Tensor  # (N,) bool: no stop token within max_completion_length
    sampling_logps: torch.Tensor | None  # (N, C) the generator's log-probs, when it reports them
    prompts: list  # N raw prompts
    completions: list  # N decoded completions (str, or [{"role": "assistant", ...}] for chat prompts)
    columns: dict[str, list]  # dataset columns, N values each
    row_index: list[int]  # dataset row of each prompt (N / n)
    rewards_per_func: torch.Tensor | None = None  # (N, K), NaN where a function returned None
    rewards: torch.Tensor | None = None  # (N,) weighted sum, NaN when no function scored it
    metrics: dict[str, float] = field(default_factory=dict)
    completion_attention_mask: torch.Tensor | None = None  # (N, C) model + environment tokens; None: completion_mask
    turn_rewards: torch.Tensor | None = None  # (N, T) each model turn's reward from the environment, 0 past the end
    turn_index: torch.Tensor | None = None  # (N, C) turn of each model token; -1 on environment tokens and padding
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # image inputs of the N rows (VLMs), else {}

    @property
    def input_ids(self) -> torch.Tensor:
        import torch

        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        import torch

        completion = self.completion_mask if self.completion_attention_mask is None else self.completion_attention_mask
        return torch.cat([self.prompt_mask, completion], dim=1)


def sample(
    generator: Generator,
    model: Any,
    batches: Sequence[dict],
    ctx: TrainContext,
    num_generations: int = 1,
    rewards: RewardSet | None = None,
) -> list[Rollout]:
    """Sample ``num_generations`` completions for every prompt of every micro-batch, in one generator call.

    Pushes the policy's weights to the generator first (once per optimizer step). In evaluation, sampling
    runs under its own seed so it never shifts the training run's random state. With ``rewards``, every
    completion is scored and the rollouts carry ``rewards_per_func``, ``rewards`` and TRL's reward and
    completion-length metrics.

    Args:
        batches: micro-batches from :func:`collate_prompts` (on the training device).
        model: the unwrapped policy.

    Returns:
        One :class:`Rollout` per micro-batch, in order.

    .. versionadded:: 1.0
    """
    config = ctx.config
    if getattr(config, "environment", None):
        from posttrain.generation._episodes import sample_episodes

        return sample_episodes(generator, model, batches, ctx, num_generations, rewards)
    if ctx.training and getattr(config, "async_generation", False):  # sampled ahead (worker process or thread)
        from posttrain.generation._async import take_rollouts

        return take_rollouts(generator, batches, ctx, num_generations, rewards)
    _sync_once(generator, model, ctx)
    return _sample_synced(generator, batches, ctx, num_generations, rewards)


def _sample_synced(
    generator: Generator, batches: Sequence[dict], ctx: TrainContext, num_generations: int, rewards: RewardSet | None
) -> list[Rollout]:
    """:func:`sample` once the generator holds the weights to sample from: generate, assemble, score. The
    asynchronous vllm-server mode calls it from its sampling thread, whose pushes follow their own handshake."""
    config, tokenizer = ctx.config, ctx.tokenizer
    prompt_lists = [
        ids[m.bool()].tolist() for b in batches for ids, m in zip(b["prompt_ids"].cpu(), b["prompt_mask"].cpu())
    ]
    mode = "train" if ctx.training else "eval"
    seeds = None
    if config.per_prompt_generation:
        seeds = [generation_seed(config.seed, mode, ctx.step, int(r)) for b in batches for r in b["row_index"]]
    scope = (
        _forked_rng(generation_seed(config.seed, mode, ctx.step, -1)) if not ctx.training else contextlib.nullcontext()
    )
    images = [p for b in batches for p in b.get("prompt_images", [None] * len(b["row_index"]))]
    with scope:  # a text-only backend never sees the images argument
        extra = {"images": images} if any(images) else {}
        done = generator.generate(prompt_lists, num_generations, seeds, **extra)
    out, start = [], 0
    for batch in batches:
        count = len(batch["row_index"]) * num_generations
        rollout = _assemble(batch, done, slice(start, start + count), num_generations, tokenizer)
        if batch.get("prompt_images"):
            rollout.model_inputs = _image_model_inputs(batch, num_generations, rollout.completion_ids.size(1), ctx)
        out.append(rollout)
        start += count
    for rollout in out:
        rollout.metrics["generation/seconds"] = done.seconds / max(len(out), 1)
        if rewards is not None:
            _score(rollout, rewards, num_generations, ctx.step + 1)  # the step being computed, counted from 1
    return out


def _sync_once(generator: Generator, model: Any, ctx: TrainContext) -> None:
    """Push weights when the policy changed since the last push (at most once per optimizer step)."""
    state = ctx.state.setdefault("posttrain.generation", {})
    if state.get("synced_step", -1) != ctx.step:  # the policy changes only at optimizer steps
        generator.sync_weights(model)
        state["synced_step"] = ctx.step


@contextlib.contextmanager
def _forked_rng(seed: int):
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _assemble(batch: dict, done: Completions, rows: slice, n: int, tokenizer: Any) -> Rollout:
    import torch

    device = batch["prompt_ids"].device
    token_ids, truncated = done.token_ids[rows], done.truncated[rows]
    width = max(1, max(len(t) for t in token_ids))
    completion_ids = torch.full((len(token_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    logps = torch.zeros((len(token_ids), width)) if done.logps is not None else None
    for i, ids in enumerate(token_ids):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[i, : len(ids)] = 1
        if logps is not None:
            logps[i, : len(ids)] = torch.tensor(done.logps[rows][i], dtype=torch.float32)
    prompts = [p for p in batch.get("prompts", [None] * len(batch["row_index"])) for _ in range(n)]
    texts = tokenizer.batch_decode([list(t) for t in token_ids], skip_special_tokens=True)
    completions = (
        [[{"role": "assistant", "content": t}] for t in texts] if prompts and isinstance(prompts[0], list) else texts
    )
    return Rollout(
        prompt_ids=batch["prompt_ids"].repeat_interleave(n, dim=0),
        prompt_mask=batch["prompt_mask"].repeat_interleave(n, dim=0),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        is_truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
        sampling_logps=logps.to(device) if logps is not None else None,
        prompts=prompts,
        completions=completions,
        columns={name: [v for v in values for _ in range(n)] for name, values in batch.get("columns", {}).items()},
        row_index=[int(r) for r in batch["row_index"]],
        metrics=_length_metrics(completion_mask.sum(1), torch.tensor(truncated, dtype=torch.bool)),
    )


def _image_model_inputs(batch: dict, n: int, completion_width: int, ctx: TrainContext) -> dict:
    """The image inputs of a rollout's N rows: each prompt's pixel values n times, and its token-aligned inputs
    left-padded like the prompt with 0 over the completion."""
    import torch

    from posttrain.vision import image_inputs

    per_row = [p for p in batch["prompt_images"] for _ in range(n)]
    out = image_inputs(ctx.processor, [p.images if p is not None else [] for p in per_row])
    width = batch["prompt_ids"].size(1)
    for name in dict.fromkeys(k for p in per_row if p is not None for k in p.token_inputs):
        values = torch.zeros((len(per_row), width + completion_width), dtype=torch.long)  # (N, P + C)
        for i, p in enumerate(per_row):
            prompt_values = p.token_inputs.get(name, []) if p is not None else []
            if prompt_values:
                values[i, width - len(prompt_values) : width] = torch.tensor(prompt_values, dtype=torch.long)
        out[name] = values
    return {name: value.to(batch["prompt_ids"].device) for name, value in out.items()}


def _length_metrics(lengths: Any, truncated: Any) -> dict[str, float]:
    lengths = lengths.float()
    terminated = lengths[~truncated]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.float().mean()),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
    }


def _score(rollout: Rollout, rewards: RewardSet, n: int, step: int) -> None:
    ids = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
    per_func = rewards.score(rollout.prompts, rollout.completions, rollout.columns, ids, rollout.row_index, n, step)
    rollout.rewards_per_func = per_func.to(rollout.completion_ids.device)
    rollout.rewards = rewards.combine(per_func).to(rollout.completion_ids.device)
    rollout.metrics.update(rewards.metrics(per_func, rewards.combine(per_func)))


# -- importance sampling ------------------------------------------------------------------------------------


def importance_weights(
    trainer_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights π_trainer / π_generator for samples drawn by another engine (or an older policy):
    the off-policy correction of TRL's ``vllm_importance_sampling_correction``, with its four modes.

    Args:
        trainer_logps: (N, C) per-token log-probs of the sampled tokens under the trained model (no grad).
        sampling_logps: (N, C) the same under the sampler; a NaN (not reported) counts as no correction for
            that token.
        mask: (N, C) completion mask.
        mode: ``token_*`` weighs each token by its ratio, ``sequence_*`` each completion by exp(Σ_t log-ratio);
            ``*_truncate`` clips the ratio into [clip_min, clip_max], ``*_mask`` zeroes ratios outside it.

    Returns:
        (weights (N, C) or (N, 1), metrics: mean/min/max ratio and the share of tokens or sequences outside
        the bounds).

    .. versionadded:: 1.0
    """
    import torch

    diff = torch.nan_to_num((trainer_logps.detach() - sampling_logps.detach()) * mask, nan=0.0)
    if mode.startswith("sequence"):
        ratio = torch.exp(diff.sum(-1, keepdim=True))  # (N, 1)
        counted = (mask.sum(-1, keepdim=True) > 0).to(ratio.dtype)
    else:
        ratio = torch.exp(diff)  # (N, C)
        counted = mask.to(ratio.dtype)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = ((ratio < low) | (ratio > high)).to(ratio.dtype)
    weights = ratio.clamp(min=clip_min, max=clip_max) if mode.endswith("truncate") else ratio * (1 - outside)
    count = counted.sum().clamp(min=1)
    valid = ratio[counted.bool()]
    metrics = {
        "importance_sampling/ratio_mean": float((ratio * counted).sum() / count),
        "importance_sampling/ratio_min": float(valid.min()) if valid.numel() else 1.0,
        "importance_sampling/ratio_max": float(valid.max()) if valid.numel() else 1.0,
        "importance_sampling/outside_fraction": float((outside * counted).sum() / count),
    }
    return weights.detach(), metrics
