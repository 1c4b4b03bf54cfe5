"""A tiny student moves toward a pattern-trained teacher; rollout, loss wiring and invariants on real models."""

from __future__ import annotations

import warnings

import pytest
import torch
from posttrain import TrainContext
from posttrain.config import build_config
from posttrain.loop import train
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance
from posttrain.testing.kit import check_grad_accumulation
from posttrain_distill import Distill, DistillConfig, generalized_jsd
from transformers import AutoModelForCausalLM

PATTERN_PROMPTS = [
    f"{w}:" for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe"]
]


def pattern_agreement(student_dir, teacher_dir) -> float:
    """Top-1 agreement of student and teacher on the teacher's pattern completions (prompt + 'abcabc' + EOS)."""
    tokenizer = load_tokenizer(str(teacher_dir))
    ids = torch.tensor([tokenizer(p + "abcabc" + tokenizer.eos_token).input_ids for p in PATTERN_PROMPTS])
    start = len(tokenizer(PATTERN_PROMPTS[0]).input_ids) - 1
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(student_dir)(input_ids=ids).logits[:, start:-1].argmax(-1)
        t = AutoModelForCausalLM.from_pretrained(teacher_dir)(input_ids=ids).logits[:, start:-1].argmax(-1)
    return (s == t).float().mean().item()


def run(student_dir, teacher_dir, tmp_path, rows, **fields):
    values = {
        "model": str(student_dir),
        "teacher_model": str(teacher_dir),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": True,
        "overwrite_output_dir": True,
        "seed": 0,
        "max_completion_length": 8,
        "per_prompt_generation": True,  # the calibration of the learning test below was measured this way
        **fields,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(Distill(), build_config(DistillConfig, values), train_dataset=rows).log_history


def measure_on_policy(student_dir, teacher_dir, out_dir, beta: float, steps: int, seed: int = 0) -> dict[str, float]:
    """The run of test_on_policy_student_moves_toward_a_pattern_teacher (``benchmarks/calibrate_learning.py
    distill-forward distill-reverse`` runs it over seeds and thread counts)."""
    before = pattern_agreement(student_dir, teacher_dir)
    history = run(
        student_dir,
        teacher_dir,
        out_dir,
        [{"prompt": p} for p in PATTERN_PROMPTS],
        max_steps=steps,
        beta=beta,
        seed=seed,
    )
    after = pattern_agreement(out_dir / "out", teacher_dir)
    logged = [row["top1_agreement"] for row in history]
    return {
        "before": before,
        "after": after,
        "logged_rise": sum(logged[-5:]) / 5 - logged[0],
        "all_on_policy": float(all(row["on_policy"] == 1.0 for row in history)),
        "lengths_in_range": float(all(1 <= row["completions/mean_length"] <= 8 for row in history)),
    }


@pytest.mark.parametrize(("beta", "steps", "floor"), [(0.0, 30, 0.7), (1.0, 40, 0.4)])
def test_on_policy_student_moves_toward_a_pattern_teacher(
    distill_student_dir, distill_pattern_teacher_dir, tmp_path, beta, steps, floor
):
    """The teacher answers every prompt with 'abcabc'; the random student learns it from its own samples only
    (prompt-only rows). Agreement on the pattern (top-1 on the teacher's completions, computed from the logits of
    both models: no sampling) goes from 0 to most tokens.

    Calibration (``python benchmarks/calibrate_learning.py distill-forward distill-reverse --seeds 0-4 --threads 1 2``,
    2026-11-30, 10 runs each): agreement at most 0.07 before; 0.85 after in every run of both (95 of 112 tokens, the
    same each time: what the student can match). Floors 0.7 (forward KL) and 0.4 (reverse KL, mode-seeking, which
    has stalled below 0.6 in earlier versions). The logged agreement (on the student's own samples, so noisy) rose by
    0.79 at least (mean 0.87) from step 1 to the last 5 steps; threshold 0.4, about half that.
    """
    m = measure_on_policy(distill_student_dir, distill_pattern_teacher_dir, tmp_path, beta, steps)
    assert m["before"] < 0.15 and m["after"] > floor, m
    assert m["logged_rise"] > 0.4, m
    assert m["all_on_policy"] == 1.0 and m["lengths_in_range"] == 1.0, m


def measure_off_policy(student_dir, teacher_dir, out_dir, seed: int = 0) -> dict[str, float]:
    """The training run of test_off_policy_loss_decreases_and_is_accumulation_invariant
    (``benchmarks/calibrate_learning.py distill-off-policy``)."""
    rows = [{"prompt": p, "completion": "abc"[: 1 + i % 3] + " x" * (i % 4)} for i, p in enumerate(PATTERN_PROMPTS)]
    history = run(student_dir, teacher_dir, out_dir, rows, lmbda=0.0, max_steps=6, beta=0.5, seed=seed)
    losses = [row["loss"] for row in history]
    return {"loss_drop": losses[0] - losses[-1], "none_on_policy": float(all(r["on_policy"] == 0.0 for r in history))}


def test_off_policy_loss_decreases_and_is_accumulation_invariant(distill_student_dir, distill_teacher_dir, tmp_path):
    """lmbda 0 trains on fixed dataset completions: the loss (a token mean of the JSD) goes down, and batch 4 x 1,
    1 x 4 and 2 x 2 give the same losses and weights (token sums over the step's token count).

    Calibration (``python benchmarks/calibrate_learning.py distill-off-policy --seeds 0-4 --threads 1 2``,
    2026-11-30, 10 runs): the loss fell by 0.0027 at least over 6 steps (mean 0.0029, from ~0.004: a random student
    and teacher start close); threshold 0.0013, about half. A student that does not train keeps its loss.
    """
    m = measure_off_policy(distill_student_dir, distill_teacher_dir, tmp_path)
    assert m["loss_drop"] > 0.0013 and m["none_on_policy"] == 1.0, m
    rows = [{"prompt": p, "completion": "abc"[: 1 + i % 3] + " x" * (i % 4)} for i, p in enumerate(PATTERN_PROMPTS)]
    overrides = {"teacher_model": str(distill_teacher_dir), "lmbda": 0.0, "max_completion_length": 8}
    check_grad_accumulation(Distill, rows, distill_student_dir, tmp_path / "ga", overrides)


def test_mixed_lmbda_follows_the_seeded_choice(distill_student_dir, distill_teacher_dir, tmp_path):
    from posttrain_distill import use_on_policy

    rows = [{"prompt": p, "completion": "abc"} for p in PATTERN_PROMPTS]
    history = run(distill_student_dir, distill_teacher_dir, tmp_path, rows, lmbda=0.5, max_steps=6)
    assert [row["on_policy"] for row in history] == [float(use_on_policy(0, s, 0, 0.5)) for s in range(6)]


def make_ctx(student_dir, teacher_dir, training=True, **fields):
    fields.setdefault("per_prompt_generation", True)
    config = DistillConfig(model=str(student_dir), teacher_model=str(teacher_dir), max_completion_length=6, **fields)
    model = load_causal_lm(str(student_dir), config)
    ctx = TrainContext(
        config=config,
        tokenizer=load_tokenizer(str(student_dir)),
        model=model,
        model_path=str(student_dir),
        training=training,
    )
    method = Distill()
    method.setup(ctx)
    return method, ctx


def test_rollout_generates_ends_at_eos_and_leaves_the_global_randomness_alone(distill_student_dir, distill_teacher_dir):
    method, ctx = make_ctx(distill_student_dir, distill_teacher_dir)
    rows = method.prepare([{"prompt": p} for p in PATTERN_PROMPTS[:4]], ctx)
    batch = method.collate(rows, ctx)
    state = torch.get_rng_state()
    (out,) = method.rollout(ctx.model, [batch], ctx)
    assert torch.equal(torch.get_rng_state(), state)  # per-prompt generation samples from forked, seeded generators
    ids, mask = out["completion_ids"], out["completion_mask"]
    assert ids.shape[0] == 4 and ids.shape[1] <= 6 and out["on_policy"].item() == 1.0
    eos, pad = ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id
    for row, m in zip(ids.tolist(), mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n) and all(t == pad for t in row[n:])
        assert eos not in row[: n - 1]  # an EOS can only be the last kept token
    # a row's completion depends on (seed, step, row) only, not on the rows sampled beside it
    (alone,) = method.rollout(ctx.model, [method.collate(rows[2:3], ctx)], ctx)
    n = int(alone["completion_mask"].sum())
    assert alone["completion_ids"][0, :n].tolist() == ids[2, :n].tolist() and n == int(mask[2].sum())
    ctx.training = False  # evaluation: other seeds than training, still reproducible and side-effect free
    first = method.rollout(ctx.model, [batch], ctx)[0]["completion_ids"]
    assert torch.equal(first, method.rollout(ctx.model, [batch], ctx)[0]["completion_ids"])
    assert torch.equal(torch.get_rng_state(), state)


def test_batched_generation_uses_the_global_generator(distill_student_dir, distill_teacher_dir):
    """per_prompt_generation false: one left-padded generate call, reproducible under the global seed."""
    method, ctx = make_ctx(distill_student_dir, distill_teacher_dir, per_prompt_generation=False)
    batch = method.collate(method.prepare([{"prompt": p} for p in ["a:", "bcdef:", "gh:"]], ctx), ctx)
    torch.manual_seed(3)
    (a,) = method.rollout(ctx.model, [batch], ctx)
    torch.manual_seed(3)
    (b,) = method.rollout(ctx.model, [batch], ctx)
    assert torch.equal(a["completion_ids"], b["completion_ids"]) and a["completion_ids"].shape[0] == 3


def test_loss_is_the_masked_jsd_token_sum(distill_student_dir, distill_teacher_dir):
    """loss_sum = sum over completion tokens of JSD(student, teacher) at the positions predicting them; n_items = tokens.
    Recomputed here from full forward passes of unpadded sequences, one row at a time."""
    method, ctx = make_ctx(distill_student_dir, distill_teacher_dir, beta=0.4, temperature=0.8)
    rows = method.prepare([{"prompt": "abcd:", "completion": "xy"}, {"prompt": "e:", "completion": "zzzz"}], ctx)
    with torch.no_grad():
        out = method.loss(ctx.model, method.collate(rows, ctx), ctx)
        expected, tolerance = 0.0, 0.0
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
            p = len(r["prompt_ids"])
            s, t = ctx.model(input_ids=ids).logits[:, p - 1 : -1], method.teacher(input_ids=ids).logits[:, p - 1 : -1]
            expected += generalized_jsd(s, t, 0.4, 0.8).sum().item()
            # the loss scores these logits in a padded batch: each logit rounds apart by at most a forward pass's
            # bound (posttrain.testing._rounding), scaled by 1/temperature, and a token's JSD moves by at most the
            # largest logit change of either model times 2 (its gradient in each model's logits is a difference of
            # two distributions: absolute values summing to <= 2)
            for logits in (s, t):
                tolerance += (
                    2
                    * len(r["completion_ids"])
                    * rounding_tolerance(float(logits.abs().max()) / 0.8 + 1.0, LOGPROB_ROUNDINGS)
                )
    assert float(out.loss_sum) == pytest.approx(expected, rel=0, abs=tolerance)
    assert int(out.n_items) == sum(len(r["completion_ids"]) for r in rows) == 3 + 5


def test_padding_free_hidden_states_are_those_of_the_former_explicit_unpad(distill_student_dir, distill_teacher_dir):
    """The padding-free path now goes through core's hidden_states(padding_free=True); it gives bit for bit the
    hidden states of the code it replaced (unpad, run the row, scatter back to the padded layout), for student and
    teacher, and "auto" follows pack_batch for each model on its own."""
    from posttrain.models import pack_batch
    from posttrain.ops import hidden_states, unpad

    method, ctx = make_ctx(distill_student_dir, distill_teacher_dir, padding_free=True)
    raw = [
        {"prompt": "abcd:", "completion": "xy"},
        {"prompt": "e:", "completion": "zzzz"},
        {"prompt": "fg", "completion": "q"},
    ]
    batch = method.collate(method.prepare(raw, ctx), ctx)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    for model, keep in ((ctx.model, method._keep_student), (method.teacher, method._keep_teacher)):
        with torch.no_grad():
            row = unpad(input_ids, attention_mask)
            hidden, _ = hidden_states(model, input_ids=row["input_ids"], position_ids=row["position_ids"])
            real = attention_mask.bool()[..., None].expand(*attention_mask.shape, hidden.size(-1))
            full = torch.zeros(real.shape, dtype=hidden.dtype).masked_scatter(real, hidden[0])
            former = full[:, -(width + 1) : -1]
            now, _ = method._completion_hidden(model, batch, keep, True)
            assert torch.equal(now, former)
            chosen, _ = method._completion_hidden(model, batch, keep, "auto")
            expected = (
                former
                if pack_batch(model, "auto", attention_mask)
                else method._completion_hidden(model, batch, keep, False)[0]
            )
            assert torch.equal(chosen, expected)
