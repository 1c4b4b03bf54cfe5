"""Optional in-process vLLM generation (``pip install 'posttrain-rloo[vllm]'``, one GPU per process).

The engine loads the policy from its path once; before the first generation of every optimizer step the
current policy weights are pushed into it, so samples always come from the policy being trained. Each
prompt's ``SamplingParams`` carries its seed, as the ``model.generate`` path does.
"""

from __future__ import annotations

from typing import Any

from posttrain import ConfigError


# Copied from posttrain_grpo._vllm.VLLMGenerator with grpo->rloo
class VLLMGenerator:
    """Colocated vLLM engine: ``generate(model, prompt_ids, num_generations, seeds, step)`` -> token lists."""

    def __init__(self, ctx: Any, method_name: str = "rloo"):
        try:
            import vllm
        except ImportError:
            raise ConfigError(
                f"use_vllm is true but vLLM is not installed; run `pip install 'posttrain-{method_name}"
                "[vllm]'` (needs a CUDA GPU), or set use_vllm false to sample with model.generate."
            ) from None
        if ctx.num_processes > 1:
            raise ConfigError(
                "use_vllm runs one in-process vLLM engine and supports a single training process; "
                f"this run has {ctx.num_processes}. Use one process or set use_vllm false."
            )
        if ctx.config.use_peft:
            raise ConfigError(
                "use_vllm with use_peft is not supported (vLLM would need the merged LoRA weights at "
                "every step); train without LoRA or set use_vllm false."
            )
        if not ctx.model_path:
            raise ConfigError("use_vllm needs the policy's path (--model PATH) for vLLM to load it.")
        config = ctx.config
        self.config = config
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=ctx.model_path,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            max_model_len=config.vllm_max_model_length,
            dtype=config.dtype,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
        )
        self.loaded_step = -1

    def sync_weights(self, model: Any) -> None:
        """Copy the policy's current weights into the engine."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, p.data) for name, p in model.named_parameters())
        self.llm.reset_prefix_cache()

    def generate(
        self, model, prompt_ids: list[list[int]], num_generations: int, seeds: list[int] | None, step: int
    ) -> list[list[int]]:
        if step != self.loaded_step:  # at most one weight push per optimizer step
            self.sync_weights(model)
            self.loaded_step = step
        c = self.config
        base = {
            "n": num_generations,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "top_k": c.top_k or -1,
            "min_p": c.min_p or 0.0,
            "repetition_penalty": c.repetition_penalty,
            "max_tokens": c.max_completion_length,
            **(c.generation_kwargs or {}),
        }
        params = [
            self.vllm.SamplingParams(**base, seed=seeds[i] if seeds is not None else None)
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [list(o.token_ids) for request in outputs for o in request.outputs]
