"""DistillConfig: the fields distillation adds to the shared TrainingConfig (TRL 1.16 names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import TrainingConfig


@dataclass
class DistillConfig(TrainingConfig):
    """Distillation fields. Defaults follow TRL 1.16's DistillationTrainer (reverse KL, always on-policy)."""

    learning_rate: float = 1e-6  # TRL's distillation default (the shared default is 5e-5)
    teacher_model: str = ""  # directory of the teacher, a causal LM with the student's tokenizer (required)
    lmbda: float = 1.0  # share of micro-batches the student samples; the rest train on dataset completions (GKD: 0.5)
    beta: float = 1.0  # generalised JSD mixture: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher)
    temperature: float = 1.0  # sampling temperature, also applied to both models' logits in the loss
    max_completion_length: int = 512  # tokens generated per completion (dataset completions are cut to it too)
    top_p: float = 1.0  # nucleus sampling for on-policy generation (1.0 = off)
    top_k: int = 0  # top-k sampling for on-policy generation (0 = off)
    per_prompt_generation: bool = True  # one generate call per prompt, seeded by (seed, step, row): batch-independent
    disable_dropout: bool = False  # set every dropout probability of the student to 0

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
        if self.temperature <= 0:
            found.append(f"temperature must be > 0, got {self.temperature}")
        if self.max_completion_length < 1:
            found.append(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not 0.0 < self.top_p <= 1.0:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        return found
