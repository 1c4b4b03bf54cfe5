"""The distillation method object: teacher loading, data, on-policy rollout and the loss wiring."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils.checkpoint
from posttrain import ConfigError, DataError, LossOutput
from posttrain.data import check
from posttrain.generation import build_generator, sample
from posttrain.models import disable_dropout, load_teacher, pack_batch, resolve_padding_free
from posttrain.ops import LOGITS_CHUNK_ELEMENTS, LMHead, hidden_states

from posttrain_distill.config import DistillConfig
from posttrain_distill.data import collate_rows, same_kind_problems, tokenize_row
from posttrain_distill.loss import generalized_jsd
from posttrain_distill.rollout import use_on_policy


def chunked_jsd(
    student: torch.Tensor,
    student_head: LMHead,
    teacher: torch.Tensor,
    teacher_head: LMHead,
    beta: float,
    temperature: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token divergence, student entropy and top-1 agreement from hidden states, a chunk of tokens at a time.

    Each chunk builds both heads' logits, reduces them and drops them; backward recomputes the chunk
    (``torch.utils.checkpoint``), so the full-vocabulary logits of the batch never exist, for student or teacher.

    Args:
        student: (M, H) student hidden states of the scored tokens (with grad). teacher: (M, H') teacher's, no grad.
        student_head, teacher_head: from :func:`posttrain.ops.hidden_states`; a larger teacher vocabulary is cut to
            the student's.
        beta, temperature: as in :func:`posttrain_distill.loss.generalized_jsd`.

    Returns:
        (divergence (M,) float32 with grad, entropy (M,) detached, same top-1 token (M,) bool).
    """

    def chunk(hs: torch.Tensor, ht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zs = student_head.logits(hs)  # (m, V) float32
        with torch.no_grad():
            zt = teacher_head.logits(ht)[:, : zs.size(-1)]
            log_ps = torch.log_softmax(zs.detach() / temperature, dim=-1)
            entropy = -(log_ps.exp() * log_ps).sum(-1)
            same = zs.detach().argmax(-1) == zt.argmax(-1)
        return generalized_jsd(zs, zt, beta, temperature), entropy, same

    vocab = student_head.vocab_size or student.size(-1)
    rows = chunk_size or max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    parts = [
        torch.utils.checkpoint.checkpoint(chunk, student[i : i + rows], teacher[i : i + rows], use_reentrant=False)
        for i in range(0, student.size(0), rows)
    ]
    if not parts:  # no scored token: empty results, still connected to the graph
        empty = student.sum(-1).float() * 0  # (0,)
        return empty, empty.detach(), empty.detach().bool()
    return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class Distill:
    """On-policy distillation (GKD): the student samples completions and matches a frozen teacher on them.

    Example::

        posttrain train distill --model ./student --teacher_model ./teacher --dataset prompts.jsonl \\
            --output_dir out --beta 1.0 --max_completion_length 256
    """

    name = "distill"
    config_class = DistillConfig
    dataset_formats = ("prompt_completion", "prompt_only")
    supports_padding_free = True  # padding_free: student and teacher run each micro-batch as one (1, N) row

    def __init__(self) -> None:
        # padding_free resolved by setup for the student and the teacher: True, False or "auto" (per micro-batch)
        self.padding_free: bool | str = False
        self.teacher_padding_free: bool | str = False
        self.teacher = None
        self.generator = None
        self._prepared_once = False
        self._keep_student = self._keep_teacher = False

    def setup(self, ctx: Any) -> None:
        config = ctx.config
        self.padding_free = resolve_padding_free(ctx.model, config.padding_free)
        if config.disable_dropout:
            disable_dropout(ctx.model)
        self.teacher = load_teacher(config.teacher_model, ctx.tokenizer, config, ctx.device)
        student_vocab = ctx.model.get_output_embeddings().weight.size(0)
        teacher_vocab = self.teacher.get_output_embeddings().weight.size(0)
        if teacher_vocab < student_vocab:
            raise ConfigError(
                f"teacher_model {config.teacher_model!r} has an output vocabulary of {teacher_vocab} tokens, smaller "
                f"than the student's {student_vocab}; the divergence compares full next-token distributions, so the "
                "teacher must cover the student's vocabulary (same tokenizer, same or larger embedding matrix)."
            )
        # each model runs the packed row on its own choice: the teacher must keep its sequences apart too
        self.teacher_padding_free = resolve_padding_free(self.teacher, config.padding_free)
        self.generator = build_generator(ctx)
        self._keep_student = _accepts_logits_to_keep(ctx.model)
        self._keep_teacher = _accepts_logits_to_keep(self.teacher)

    def prepare(self, dataset: Any, ctx: Any) -> list[dict]:
        check(dataset, self.dataset_formats)
        raw = [dict(row) for row in dataset]
        problems = same_kind_problems(raw)
        if problems:
            raise DataError(problems[0])
        rows = [tokenize_row(row, ctx.tokenizer, ctx.config.max_completion_length) for row in raw]
        for i, row in enumerate(rows):
            row["index"] = i  # seeds this row's samples (per_prompt_generation)
        first, self._prepared_once = not self._prepared_once, True
        if first and ctx.config.lmbda < 1.0 and rows and "completion_ids" not in rows[0]:
            raise ConfigError(
                f"lmbda={ctx.config.lmbda} asks for {1 - ctx.config.lmbda:.0%} off-policy micro-batches, which train "
                "on dataset completions, but the training data is prompt-only (no 'completion' column). Use "
                "prompt-completion rows, or set lmbda 1.0 to always generate."
            )
        return rows

    def check_rows(self, dataset: Any) -> list[str]:
        """Problems beyond the standard format checks, for ``posttrain check-data distill FILE``."""
        return same_kind_problems([dict(row) for row in dataset])

    def collate(self, rows: list[dict], ctx: Any) -> dict:
        return collate_rows(rows, ctx.tokenizer.pad_token_id)

    @torch.no_grad()
    def rollout(self, model: Any, batches: list[dict], ctx: Any) -> list[dict]:
        """Micro-batch k of a step is on-policy (the student samples its completion) with probability lmbda, a
        seeded choice of (seed, step, k); the on-policy ones are sampled together in one generator call."""
        config = ctx.config
        choices = []
        for k, batch in enumerate(batches):
            if "completion_ids" not in batch:
                choices.append(True)  # prompt-only rows: the student always writes the completion
            elif ctx.training:
                choices.append(use_on_policy(config.seed, ctx.step, k, config.lmbda))
            else:
                choices.append(False)  # evaluation scores the dataset completions when there are some
        on_policy = [b for b, on in zip(batches, choices) if on]
        sampled = iter(sample(self.generator, model, on_policy, ctx) if on_policy else [])
        out = []
        for batch, on in zip(batches, choices):
            if on:
                r = next(sampled)
                batch = {**batch, "completion_ids": r.completion_ids, "completion_mask": r.completion_mask}
            out.append({**batch, "on_policy": torch.tensor(float(on))})
        return out

    def _completion_hidden(self, model: Any, batch: dict, keep: bool, free: bool | str) -> tuple[torch.Tensor, LMHead]:
        """(B, C, H) hidden states predicting each completion token (positions P-1 ... P+C-2), and the head.

        ``free`` (``True``, ``False`` or ``"auto"``: :func:`posttrain.models.pack_batch` decides for this model and
        micro-batch) runs the rows as one padding-free row, the hidden states put back in the padded layout (0 at
        padding, which predicts no scored token)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P+C)
        width = batch["completion_ids"].size(1)
        # left-padded prompts: positions count real tokens only, as in generate() (padding-free: restarts instead)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": width + 1} if keep else {}
        hidden, head = hidden_states(
            model,
            padding_free=pack_batch(model, free, attention_mask),
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )  # (B, P+C or C+1, H)
        return hidden[:, -(width + 1) : -1], head

    def loss(self, model: Any, batch: dict, ctx: Any) -> LossOutput:
        config = ctx.config
        mask = batch["completion_mask"]  # (B, C)
        # true works without setup; auto needs it, and each model packs this micro-batch where that is cheaper
        free, teacher_free = (
            (True, True) if config.padding_free is True else (self.padding_free, self.teacher_padding_free)
        )
        student, student_head = self._completion_hidden(model, batch, self._keep_student, free)  # (B, C, H)
        with torch.no_grad():
            teacher, teacher_head = self._completion_hidden(self.teacher, batch, self._keep_teacher, teacher_free)
        scored = mask.bool()  # (B, C): only completion tokens reach the heads, a chunk at a time
        per_token, entropy, same = chunked_jsd(
            student[scored], student_head, teacher[scored], teacher_head, config.beta, config.temperature
        )  # (M,) each
        n_tokens = mask.sum()
        with torch.no_grad():
            metrics = {
                "entropy": entropy.sum() / n_tokens.clamp(min=1),
                "top1_agreement": same.sum().float() / n_tokens.clamp(min=1),
                "completions/mean_length": mask.sum(1).float().mean(),
                "on_policy": batch.get("on_policy", torch.tensor(0.0)),
            }
        return LossOutput(loss_sum=per_token.sum(), n_items=n_tokens, metrics=metrics)
