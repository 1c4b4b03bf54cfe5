"""RLOOConfig: TRL 1.16 field names and defaults, only the fields this plugin implements."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import TrainingConfig


@dataclass
class RLOOConfig(TrainingConfig):
    """REINFORCE Leave-One-Out. `per_device_train_batch_size` counts *prompts*; each prompt gets
    `num_generations` completions, so a micro-batch holds batch x num_generations sequences."""

    learning_rate: float = 1e-6  # TRL's RLOO default
    # -- rewards
    reward_funcs: list[str] = field(default_factory=list)  # reward names (entry points or hook-registered)
    reward_weights: list[float] | None = None  # one weight per reward function; None -> all 1.0
    reward_clip_range: list[float] | None = None  # [low, high] clamp of the weighted reward, before the KL penalty
    normalize_advantages: bool = False  # standardise advantages over the micro-batch
    # -- sampling
    num_generations: int = 2  # completions sampled per prompt (k >= 2; the baseline leaves one out)
    max_completion_length: int = 512  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # 0 disables top-k
    min_p: float | None = None  # minimum token probability relative to the most likely one
    repetition_penalty: float = 1.0  # 1.0 disables it
    generation_kwargs: dict | None = None  # extra transformers GenerationConfig / vLLM SamplingParams fields
    per_prompt_generation: bool = True  # one generate call per prompt, seeded by (seed, step, row)
    mask_truncated_completions: bool = False  # completions that end without EOS get no loss
    # -- objective
    beta: float = 0.05  # KL penalty in the reward: r - beta * sum_t (logp_old - logp_ref); 0 loads no reference model
    epsilon: float = 0.2  # lower clipping bound of the sequence importance ratio: 1 - epsilon
    epsilon_high: float | None = None  # upper bound 1 + epsilon_high; None -> epsilon
    num_iterations: int = 1  # optimizer steps per generation batch (mu); >1 reuses each micro-batch's rollout
    # -- vLLM (pip install 'posttrain-rloo[vllm]')
    use_vllm: bool = False  # generate with an in-process vLLM engine on this process's GPU
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory vLLM may take
    vllm_max_model_length: int | None = None  # vLLM context length; None -> the model's

    def problems(self) -> list[str]:
        found = super().problems()
        if self.num_generations < 2:
            found.append(
                f"num_generations must be >= 2 (the leave-one-out baseline needs another sample), "
                f"got {self.num_generations}"
            )
        if self.max_completion_length < 1:
            found.append(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature <= 0:
            found.append(f"temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.num_iterations < 1:
            found.append(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            found.append(f"epsilon and epsilon_high must be >= 0, got {self.epsilon} and {self.epsilon_high}")
        if self.beta < 0:
            found.append(f"beta must be >= 0, got {self.beta}")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2 or self.reward_clip_range[0] > self.reward_clip_range[1]
        ):
            found.append(f"reward_clip_range must be [low, high] with low <= high, got {self.reward_clip_range}")
        if self.reward_weights is not None and self.reward_funcs and len(self.reward_weights) != len(self.reward_funcs):
            found.append(
                f"reward_weights has {len(self.reward_weights)} values but reward_funcs names "
                f"{len(self.reward_funcs)} functions ({', '.join(self.reward_funcs)}); give one weight each"
            )
        if len(set(self.reward_funcs)) != len(self.reward_funcs):
            found.append(f"reward_funcs names a function twice: {self.reward_funcs}; use reward_weights to weight it")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            found.append(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        return found
