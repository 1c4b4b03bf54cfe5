"""The ``hf`` backend: transformers ``generate`` with the KV cache, on the policy being trained."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from posttrain.generation import Completions, PromptImages, SamplingParams


class HFGenerator:
    """Samples with ``model.generate`` (batched, left-padded prompts, KV cache, eval mode).

    Without seeds, every prompt x n of the call is sampled in batches of at most ``batch_size`` sequences
    (all at once by default: one decode loop per optimizer step). With seeds (``per_prompt_generation``),
    each prompt's n samples are one call under that prompt's seed, so a completion depends on (prompt, seed)
    only, never on the rest of the batch. Prompts with images get their pixel values from ``processor`` for
    every call (a vision-language model's ``generate`` takes them with the ids).
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        params: SamplingParams,
        batch_size: int | None = None,
        report_logps: bool = False,
        processor: Any = None,
    ):
        self.model = model
        self.processor = processor
        self.params = params
        self.batch_size = batch_size
        self.reports_logps = report_logps
        self.config = self._generation_config(params, report_logps)
        if processor is not None:
            from posttrain.vision import image_token_id

            # a sampled image token would ask the model for an image that is not there: the forward pass fails
            # ("image features and image tokens do not match"), so a vision-language model never samples one
            token = image_token_id(processor)
            self.config.suppress_tokens = [
                *(self.config.suppress_tokens or []),
                *([token] if token is not None else []),
            ]

    @staticmethod
    def _generation_config(params: SamplingParams, report_logps: bool):
        from transformers import GenerationConfig

        kwargs = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": True,
            "use_cache": True,
            "pad_token_id": params.pad_token_id,
            "eos_token_id": list(params.stop_token_ids),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,  # 0 disables top-k; None would let transformers apply its default of 50
            "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty,
            "output_logits": report_logps,
            "return_dict_in_generate": report_logps,
        }
        kwargs.update(params.extra)
        return GenerationConfig(**kwargs)

    def sync_weights(self, model: Any) -> None:
        self.model = model  # the policy itself: nothing to copy

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        seeds: list[int] | None = None,
        images: list[PromptImages | None] | None = None,
    ) -> Completions:
        start = time.perf_counter()
        rows = [p for p in prompt_ids for _ in range(n)]
        row_images = [p for p in images for _ in range(n)] if images is not None else [None] * len(rows)
        if seeds is not None:
            calls = [(list(range(i * n, (i + 1) * n)), seed) for i, seed in enumerate(seeds)]
        else:
            size = self.batch_size or len(rows) or 1
            calls = [(list(range(s, min(s + size, len(rows)))), None) for s in range(0, len(rows), size)]
        token_ids: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        model = self.model
        was_training = model.training
        model.eval()  # no dropout noise; gradient checkpointing is inactive in eval, so the KV cache is used
        try:
            for indices, seed in calls:
                ids, lps = self._call(model, [rows[i] for i in indices], seed, [row_images[i] for i in indices])
                for i, t, lp in zip(indices, ids, lps):
                    token_ids[i], logps[i] = t, lp
        finally:
            model.train(was_training)
        stops = set(self.params.stop_token_ids)
        cut, truncated, cut_logps = [], [], []
        for ids, lp in zip(token_ids, logps):
            end = next((j for j, t in enumerate(ids) if t in stops), None)
            keep = len(ids) if end is None else end + 1
            cut.append(ids[:keep])
            cut_logps.append(lp[:keep])
            truncated.append(end is None)
        return Completions(cut, truncated, cut_logps if self.reports_logps else None, time.perf_counter() - start)

    def _call(
        self, model: Any, rows: list[list[int]], seed: int | None, images: list[PromptImages | None]
    ) -> tuple[list[list[int]], list[list[float]]]:
        device = next(model.parameters()).device
        width = max(len(r) for r in rows)
        pad = self.params.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        extra = self._image_inputs(images, width, device) if any(images) else {}
        # FSDP2 and ZeRO-3: each forward all-gathers the parameters, a collective, so every process keeps stepping
        # until all of them are done (transformers' synced_gpus) instead of leaving the decode loop early and hanging
        from posttrain._distributed import is_fsdp_module, is_zero3_module

        sharded = is_fsdp_module(model) or is_zero3_module(model)
        synced = sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        with _seeded(seed, device):
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=self.config, synced_gpus=synced or None, **extra
            )
        sequences = out.sequences if self.reports_logps else out
        new = sequences[:, width:]
        logps: list[list[float]] = [[] for _ in rows]
        if self.reports_logps:
            # raw logits of each step -> log-softmax at the sampling temperature, as the trainer computes them
            stacked = torch.stack(out.logits, dim=1).float() / self.params.temperature  # (B, T, V)
            chosen = torch.log_softmax(stacked, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            logps = chosen.tolist()
        return new.tolist(), logps

    def _image_inputs(self, images: list[PromptImages | None], width: int, device: torch.device) -> dict:
        """Pixel values of the call's prompts, and their token-aligned inputs left-padded like the ids."""
        from posttrain.vision import image_inputs

        if self.processor is None:
            raise ValueError("prompts have images but the hf generator has no processor; build it with processor=")
        extra = image_inputs(self.processor, [p.images if p is not None else [] for p in images])
        for name in dict.fromkeys(k for p in images if p is not None for k in p.token_inputs):
            values = torch.zeros((len(images), width), dtype=torch.long)  # (B, P), left-padded with 0
            for i, p in enumerate(images):
                row_values = p.token_inputs.get(name, []) if p is not None else []
                if row_values:
                    values[i, width - len(row_values) :] = torch.tensor(row_values, dtype=torch.long)
            extra[name] = values
        return {name: value.to(device) for name, value in extra.items()}


def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        return contextlib.nullcontext()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )

    @contextlib.contextmanager
    def scope():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return scope()
