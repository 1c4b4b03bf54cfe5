"""The task of ``posttrain demo``: two-digit plus one-digit addition as a chat, with a checkable answer.

A user turn ``"47+8"`` is answered ``"55"``. The 900 problems (10-99 plus 0-9) are split once, with a
fixed seed, into 700 training problems and 200 held-out ones, so every run and every seed is scored
on the same held-out set. SFT gets worked answers for only the first 200 training problems (written
demonstrations are the expensive kind of data); GRPO gets all 700 training prompts with their answer
for the verifier only. Scoring is greedy decoding and exact match of the answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SPLIT_SEED = 1234  # fixed: the held-out set does not move with --seed
N_HELD_OUT = 200
N_DEMONSTRATIONS = 200  # SFT learns from these few and levels off at 15-50% held-out: room for GRPO
MAX_ANSWER_TOKENS = 4  # up to three digits and the end-of-turn token


def problems() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held_out) lists of (a, b) pairs; disjoint, the same on every call."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[N_HELD_OUT:], pairs[:N_HELD_OUT]


def prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}+{b}"}]


def sft_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """Conversational prompt-completion rows (posttrain-sft trains on the completion only)."""
    return [{"prompt": prompt(a, b), "completion": [{"role": "assistant", "content": str(a + b)}]} for a, b in pairs]


def grpo_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """Prompt-only rows; the ``answer`` column reaches the reward functions (``accuracy`` reads it)."""
    return [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def digit_match(prompts: list, completions: list, answer: list, **columns: Any) -> list[float]:
    """Partial credit: the share of the answer's digits that are right, aligned from the units digit.

    ``55`` for 55 scores 1.0, ``45`` scores 0.5, ``155`` scores 2/3 (the extra digit counts as wrong).
    Reported next to exact match: it shows progress on the digits before whole answers come right.
    """
    out = []
    for completion, expected in zip(completions, answer):
        got = _text(completion).strip()
        width = max(len(got), len(expected), 1)
        out.append(sum(x == y for x, y in zip(got.rjust(width), expected.rjust(width))) / width)
    return out


def greedy_answers(model: Any, tokenizer: Any, pairs: list[tuple[int, int]], batch_size: int = 256) -> list[str]:
    """The model's greedy answer to each problem (left-padded batches, stops at end-of-turn)."""
    import torch

    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                texts = [
                    tokenizer.apply_chat_template(prompt(a, b), tokenize=False, add_generation_prompt=True)
                    for a, b in pairs[start : start + batch_size]
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=MAX_ANSWER_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                answers += [
                    t.strip()
                    for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                ]
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return answers


def score(model: Any, tokenizer: Any, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """Held-out exact-match accuracy and mean digit-match credit of greedy answers."""
    answers = greedy_answers(model, tokenizer, pairs)
    expected = [str(a + b) for a, b in pairs]
    exact = sum(got == want for got, want in zip(answers, expected)) / len(pairs)
    digits = sum(digit_match([], answers, expected)) / len(pairs)
    return {"accuracy": round(exact, 4), "digit_accuracy": round(digits, 4)}


class HeldOutEval:
    """A loop callback: score the policy on the held-out set every ``every`` logged steps before ``last``
    (the final model is scored from its saved files), appending to ``log``. Greedy decoding draws no
    random numbers, so it leaves the run's sampling unchanged."""

    def __init__(
        self, pairs: list[tuple[int, int]], every: int, stage: str, step_offset: int, last: int, log: list[dict]
    ):
        self.pairs, self.every, self.stage, self.offset, self.last, self.log = (
            pairs,
            every,
            stage,
            step_offset,
            last,
            log,
        )

    def on_log(self, ctx: Any, metrics: dict) -> None:
        step = metrics["step"]
        if self.every and step % self.every == 0 and step < self.last:
            scores = score(ctx.model, ctx.tokenizer, self.pairs)
            self.log.append({"stage": self.stage, "step": step, "demo_step": self.offset + step, **scores})
