"""The posttrain conformance kit, full tier, on distillation's default: every micro-batch on-policy (lmbda 1)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from posttrain.testing import build_tiny_model
from posttrain.testing.kit import conformance_suite

# the kit builds the student; the teacher path must be known when the suite is defined
_TEACHER_DIR = Path(tempfile.mkdtemp(prefix="posttrain-distill-kit-teacher-"))
atexit.register(shutil.rmtree, _TEACHER_DIR, ignore_errors=True)
TEACHER = build_tiny_model(_TEACHER_DIR, hidden_size=48, seed=1)

# prompt-completion rows: training samples its own completions (lmbda 1); the kit's padding check calls loss()
# without rollout, so it scores these dataset completions, exercising the same loss path
ROWS = [
    {"prompt": f"Say {w}:", "completion": f" {w}" * (1 + i % 3)}
    for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"])
]

# every check holds with lmbda 1 and per_prompt_generation: each prompt's completion is sampled under a
# seed of (seed, step, row), so batch 4 x 1, 1 x 4 and 2 x 2 train on the same completions
TestConformance = conformance_suite(
    "distill",
    rows=ROWS,
    config={"teacher_model": str(TEACHER), "max_completion_length": 8, "per_prompt_generation": True},
    tier="full",
)
