"""The ``vllm`` backend: a vLLM engine in this process, sharing the GPU with training.

Only vLLM's public API is used: ``vllm.LLM`` (``generate``, ``collective_rpc``, ``sleep``/``wake_up``,
``reset_prefix_cache``) and its trainer-side weight-transfer API (``vllm.distributed.weight_transfer``:
``WeightTransferTrainerFactory`` with the IPC engine, which hands the trainer's CUDA tensors to the engine's
workers without a copy, driven through a client that forwards the four control calls to the workers with
``collective_rpc``). The supported vLLM versions are pinned by core's ``vllm`` extra (the API of 0.33).
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

    A LoRA policy is sent merged, computed out of place (base weight + the active adapters' deltas) under the
    base model's names: the model itself is never modified, so its frozen base weights cannot drift by the
    rounding of repeated merge/unmerge cycles.
    """
    if not (hasattr(model, "get_base_model") and hasattr(model, "peft_config")):
        for name, param in model.named_parameters():
            yield name, param.data
        return
    base = model.get_base_model()
    adapted = {n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name, param in base.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue  # adapters are folded in below; a trained copy replaces the original module
        tensor = param.data
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner is not None and name.endswith(".base_layer.weight"):
            module = adapted[owner]
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
        yield name.replace(".base_layer", "").replace(".modules_to_save.default", ""), tensor


def policy_source(model: Any) -> Any:
    """A vLLM ``WeightSource`` over the policy: names, dtypes and shapes declared once, and every round the
    current full weights (a LoRA policy merged, see :func:`policy_weights`; FSDP shards gathered by
    ``full_tensor``). Built lazily: importing vLLM costs seconds and needs a GPU build."""
    from functools import cached_property

    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class PolicySource(WeightSource):
        def __init__(self, module: Any) -> None:
            self.module = module

        @cached_property
        def metadata(self) -> list:
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in policy_weights(self.module)]

        def iter_full(self):
            for name, tensor in policy_weights(self.module):
                full = getattr(tensor, "full_tensor", None)
                yield name, full() if callable(full) else tensor

    return PolicySource(model)


class LocalClient:
    """vLLM's weight-sync client protocol for an in-process ``LLM``: each control call runs on every worker."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: Any) -> None:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.collective_rpc("finish_weight_update")


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
        self.asleep = False
        self.transfer = None  # the trainer-side engine, created at the first push

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model: Any) -> None:
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        self._wake()
        if self.transfer is None or self.transfer.source.module is not model:
            self.transfer = WeightTransferTrainerFactory.trainer_init(
                IPCTrainerInitInfo(rank=0), client=LocalClient(self.llm), source=policy_source(model)
            )
        self.transfer.send_weights()  # start_weight_update, update_weights, finish_weight_update
        self.llm.reset_prefix_cache()

    def generate(
        self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None, images: list | None = None
    ) -> Completions:
        start = time.perf_counter()
        self._wake()
        base = vllm_sampling_kwargs(self.params, n)
        sampling = [
            self.vllm.SamplingParams(**base, seed=seeds[i] if seeds is not None else None)
            for i in range(len(prompt_ids))
        ]
        prompts: list[dict] = [{"prompt_token_ids": ids} for ids in prompt_ids]
        if images is not None:  # vLLM's multimodal input; the ids already hold each image's expanded tokens
            from posttrain.vision import load_image

            for prompt, entry in zip(prompts, images):
                if entry is not None and entry.images:
                    prompt["multi_modal_data"] = {"image": [load_image(v) for v in entry.images]}
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
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
