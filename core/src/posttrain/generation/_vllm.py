"""The ``vllm`` backend: a vLLM engine in this process, sharing the GPU with training.

Only vLLM's public API is used: ``vllm.LLM`` (``generate``, ``sleep``/``wake_up``, ``reset_prefix_cache``)
and its weight-transfer API (``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` with
the IPC engine, which hands the trainer's CUDA tensors to the engine without a copy). Supported vLLM
versions are pinned by core's ``vllm`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from posttrain._errors import ConfigError
from posttrain.generation import Completions, SamplingParams

VLLM_HINT = "pip install 'posttrain[vllm]' (a CUDA GPU is needed)"


def import_vllm(backend: str) -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            f"generation_backend {backend!r} needs vLLM, which is not installed; run `{VLLM_HINT}`, or set "
            "generation_backend hf to sample with transformers' generate."
        ) from None
    return vllm


def policy_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the policy's full weights as vLLM names them (checkpoint format).

    A LoRA policy is merged for the duration of the iteration (adapters folded into the base weights, then
    unfolded), so the engine samples from exactly the policy being trained.
    """
    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if is_peft:
        model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if is_peft:
                if "lora_" in name or ".original_module." in name:
                    continue  # adapters are merged in; a trained copy replaces the original module
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace(".modules_to_save.default", "")
            yield name, param.data
    finally:
        if is_peft:
            model.unmerge_adapter()


def vllm_sampling_kwargs(params: SamplingParams, n: int) -> dict[str, Any]:
    return {
        "n": n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or -1,  # vLLM: -1 disables top-k
        "min_p": params.min_p or 0.0,
        "repetition_penalty": params.repetition_penalty,
        "stop_token_ids": list(params.stop_token_ids),
        "logprobs": 0,  # the log-prob of each sampled token
        **params.extra,
    }


def chosen_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The sampled tokens' log-probs out of vLLM's per-position ``{token_id: Logprob}`` mappings."""
    if logprobs is None:
        return [0.0] * len(token_ids)
    out = []
    for token, position in zip(token_ids, logprobs):
        entry = position.get(token) if isinstance(position, dict) else position
        out.append(float(getattr(entry, "logprob", entry)))
    return out


class VLLMGenerator:
    """In-process vLLM engine; weights pushed through the IPC weight-transfer engine once per step."""

    name = "vllm"
    reports_logps = True

    def __init__(self, ctx: Any, params: SamplingParams):
        config = ctx.config
        self.vllm = import_vllm("vllm")
        if ctx.num_processes > 1:
            raise ConfigError(
                f"generation_backend 'vllm' runs one engine inside the training process; this run has "
                f"{ctx.num_processes} processes. Use generation_backend vllm-server (a `vllm serve` on its own GPUs, "
                "shared by every training process), or train with one process."
            )
        if not ctx.model_path:
            raise ConfigError("generation_backend 'vllm' needs the policy's path (--model PATH) for vLLM to load it.")
        self.params = params
        self.sleep_mode = config.vllm_enable_sleep_mode
        self.llm = self.vllm.LLM(
            model=ctx.model_path,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            max_model_len=config.vllm_max_model_length,
            dtype=config.dtype,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            enable_sleep_mode=self.sleep_mode,
            logprobs_mode="processed_logprobs",  # at the sampling temperature, as the trainer computes them
            weight_transfer_config={"backend": "ipc"},
        )
        self.llm.init_weight_transfer_engine({"init_info": {}})
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model: Any) -> None:
        from dataclasses import asdict

        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerSendWeightsArgs, IPCWeightTransferEngine

        self._wake()
        self.llm.start_weight_update(is_checkpoint_format=True)
        IPCWeightTransferEngine.trainer_send_weights(
            policy_weights(model),
            IPCTrainerSendWeightsArgs(send_mode=lambda info: self.llm.update_weights({"update_info": asdict(info)})),
        )
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None) -> Completions:
        start = time.perf_counter()
        self._wake()
        base = vllm_sampling_kwargs(self.params, n)
        sampling = [
            self.vllm.SamplingParams(**base, seed=seeds[i] if seeds is not None else None)
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=sampling, use_tqdm=False
        )
        token_ids, truncated, logps = [], [], []
        for request in outputs:
            for sample in request.outputs:
                ids = list(sample.token_ids)
                token_ids.append(ids)
                truncated.append(not ids or ids[-1] not in self.params.stop_token_ids)
                logps.append(chosen_logprobs(ids, sample.logprobs))
        if self.sleep_mode:
            self.llm.sleep(level=1)  # free the KV cache and weights for training
            self.asleep = True
        return Completions(token_ids, truncated, logps, time.perf_counter() - start)

    def close(self) -> None:
        self.llm = None
