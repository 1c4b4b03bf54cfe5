"""DistillConfig: the fields distillation adds to the shared TrainingConfig (TRL 1.16 names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.generation import OnlineConfig


@dataclass
class DistillConfig(OnlineConfig):
    """Distillation fields. Defaults follow TRL 1.16's DistillationTrainer (reverse KL, always on-policy).

    Sampling (temperature, top_p, top_k, max_completion_length, per_prompt_generation, the generation backend)
    comes from core's OnlineConfig; ``temperature`` also scales both models' logits in the loss."""

    learning_rate: float = 1e-6  # TRL's distillation default (the shared default is 5e-5)
    teacher_model: str = ""  # directory of the teacher, a causal LM with the student's tokenizer (required)
    lmbda: float = 1.0  # share of micro-batches the student samples; the rest train on dataset completions (GKD: 0.5)
    beta: float = 1.0  # generalised JSD mixture: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher)
    max_completion_length: int = 512  # tokens generated per completion (dataset completions are cut to it too)
    disable_dropout: bool = False  # set every dropout probability of the student to 0
    per_prompt_generation: bool = True  # 1.0's batch-independent samples; false batches them (faster)
    padding_free: bool | Literal["auto"] = "auto"  # one unpadded row per forward; auto: where estimated faster

    def problems(self) -> list[str]:
        found = super().problems()
        if not self.teacher_model:
            found.append(
                "teacher_model is required: pass --teacher_model PATH (a directory saved with "
                "save_pretrained, using the student's tokenizer)"
            )
        if not 0.0 <= self.lmbda <= 1.0:
            found.append(f"lmbda must be in [0, 1], got {self.lmbda}")
        if not 0.0 <= self.beta <= 1.0:
            found.append(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.beta}")
        if self.environment:
            found.append(
                f"environment ({self.environment!r}) is not supported by distill yet: its student and teacher "
                "forwards attend to the model's tokens only, and would not see the environment's observations in "
                "an episode; train against environments with grpo or rloo, or remove environment"
            )
        return found
