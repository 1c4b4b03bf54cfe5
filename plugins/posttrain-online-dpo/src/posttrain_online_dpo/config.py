"""OnlineDPOConfig: TRL 1.16 field names and defaults (``trl.experimental.online_dpo``), only the fields implemented.

Sampling and the generation backend are core's :class:`OnlineConfig` fields: ``max_completion_length`` is TRL's
``max_new_tokens`` (same default here, 64) and ``generation_backend: vllm`` replaces ``use_vllm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.generation import OnlineConfig
from posttrain.rewards import reward_config_problems

from posttrain_online_dpo.loss import LOSSES


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """Online DPO. As in TRL's online DPO, `per_device_train_batch_size` counts *prompts*: each prompt is
    sampled twice and gives one preference pair, so a micro-batch holds 2 x per_device_train_batch_size
    completions. Pairs are ranked by reward functions (`reward_funcs`, a reward model among them) or by a
    pairwise judge (`judge`), never both."""

    learning_rate: float = 5e-7  # TRL's online DPO default; tiny models need ~1e-3
    per_device_train_batch_size: int = 8  # prompts per micro-batch, one pair (two completions) each, as TRL
    per_device_eval_batch_size: int = 8  # prompts per evaluation micro-batch
    max_completion_length: int = 64  # new tokens per completion (TRL: max_new_tokens, default 64)
    temperature: float = 0.9  # sampling temperature (TRL's default); log-probs are taken at temperature 1
    max_length: int = 512  # prompt + completion tokens in the loss forward; the prompt's start is cut (TRL)
    # -- ranking: reward functions (higher score is chosen) or a pairwise judge
    reward_funcs: list[str] = field(default_factory=list)  # reward names (entry points or hook-registered)
    reward_weights: list[float] | None = None  # one weight per reward function; None -> all 1.0
    reward_kwargs: dict[str, dict] | None = None  # options per reward name, e.g. {format: {pattern: ...}}
    judge: str | None = None  # a pairwise judge's name (a posttrain.rewards entry point marked @judge)
    judge_kwargs: dict | None = None  # the judge's options, field -> value
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion with no EOS (>= 0)
    # -- objective
    beta: float = 0.1  # deviation from the reference; higher stays closer (paper: 0.1). tau for ipo
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid (DPO) or ipo (IPO on sequence log-ratios)
    disable_dropout: bool = True  # zero every dropout in the policy and the reference, as TRL does
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per micro-batch; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if self.beta <= 0:
            found.append(f"beta must be > 0, got {self.beta}; it scales the log-ratios (ipo divides by it)")
        if self.loss_type not in LOSSES:  # the Literal already says so; kept in sync with loss.LOSSES
            found.append(f"loss_type must be one of {', '.join(LOSSES)}, got {self.loss_type!r}")
        if self.max_completion_length >= self.max_length:
            found.append(
                f"max_completion_length ({self.max_completion_length}) must be smaller than max_length "
                f"({self.max_length}), or a long completion would leave no prompt token in the loss forward; "
                f"raise max_length (e.g. {self.max_completion_length + 512})"
            )
        if self.judge and self.reward_funcs:
            found.append(
                f"judge ({self.judge!r}) and reward_funcs ({', '.join(self.reward_funcs)}) are both set; pairs are "
                "ranked by one of them, so remove the other"
            )
        if self.judge_kwargs and not self.judge:
            found.append("judge_kwargs is set but judge is not; name the judge the options are for")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            found.append(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
        if self.missing_eos_penalty is not None and self.judge:
            found.append(
                "missing_eos_penalty lowers reward scores, and a judge gives none; remove it, or let the judge "
                "prefer completions that end"
            )
        if self.environment:
            found.append(
                f"environment ({self.environment!r}) is not supported by online-dpo yet: its loss forward attends to "
                "the model's tokens only, and would not see the environment's observations in an episode; train "
                "against environments with grpo or rloo, or remove environment"
            )
        if self.importance_sampling_correction:
            found.append(
                "importance_sampling_correction is not supported by online-dpo: the DPO loss does not weight "
                "samples by the policy that drew them (TRL neither); set it to null or false"
            )
        found += reward_config_problems(self.reward_funcs, self.reward_weights)
        return found
