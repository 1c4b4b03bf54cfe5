"""Online DPO's data: prompt rows, the collated prompt batch, and the rolled-out pair batch, as exact tensors.

Token ids of the test tokenizer: pad 0, EOS 1, 'a'..'d' 5..8, 'x' 28, '0'..'4' 57..61.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import DataError, TrainContext
from posttrain_online_dpo import OnlineDPO, OnlineDPOConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

# prompt "ab": 'x' EOS | '0' '1' EOS        prompt "abcd": '2' '3' '4' (no EOS: truncated) | 'x' 'x' EOS
PAIRS = [([28, 1], [57, 58, 1]), ([59, 60, 61], [28, 28, 1])]


def longer(prompts, completions, completion_ids, **columns):
    return [float(len(ids)) for ids in completion_ids]


def rolled_out(model_dir, generator_class, rows=None, rewards=None, **fields):
    config = OnlineDPOConfig(model=str(model_dir), max_completion_length=3, seed=0, **fields)
    ctx = TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
        rewards=rewards if rewards is not None else {"longer": longer},
    )
    method = OnlineDPO()
    method.setup(ctx)
    method.generator = generator_class(PAIRS)
    rows = rows or [{"prompt": "ab", "answer": "1"}, {"prompt": "abcd", "answer": "2"}]
    batch = method.collate(method.prepare(datasets.Dataset.from_list(rows), ctx), ctx)
    return method, ctx, batch, method.rollout(ctx.model, [batch], ctx)[0]


def test_prompts_are_collated_left_padded_with_their_columns(odpo_tiny_model, odpo_fixed_generator):
    _, _, batch, _ = rolled_out(odpo_tiny_model, odpo_fixed_generator)
    assert batch["prompt_ids"].tolist() == [[0, 0, 5, 6], [5, 6, 7, 8]]
    assert batch["prompt_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["columns"] == {"answer": ["1", "2"]} and batch["row_index"] == [0, 1]


def test_rollout_orders_every_pair_chosen_then_rejected(odpo_tiny_model, odpo_fixed_generator):
    """Scores = completion lengths: prompt 0 (2 vs 3) -> the second sample wins; prompt 1 (3 vs 3) is a tie -> the
    first. Samples in sampling order are rows 0-3, so [chosen; rejected] = rows [1, 2; 0, 3]."""
    _, _, _, out = rolled_out(odpo_tiny_model, odpo_fixed_generator)
    assert out["winner"].tolist() == [1.0, 0.0]
    assert out["input_ids"].tolist() == [
        [0, 0, 5, 6, 57, 58, 1],
        [5, 6, 7, 8, 59, 60, 61],
        [0, 0, 5, 6, 28, 1, 0],
        [5, 6, 7, 8, 28, 28, 1],
    ]
    assert out["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert out["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert out["scores"].tolist() == [3.0, 3.0, 2.0, 3.0] and out["truncated"].tolist() == [False, True, False, False]
    assert out["ref_logps"].shape == (4,)


def test_missing_eos_penalty_lowers_the_score_of_a_completion_that_never_ended(odpo_tiny_model, odpo_fixed_generator):
    """Prompt 1's first sample has no EOS: 3 - 1 = 2 < 3, so the second sample now wins: rows [1, 3; 0, 2]."""
    _, _, _, out = rolled_out(odpo_tiny_model, odpo_fixed_generator, missing_eos_penalty=1.0)
    assert out["winner"].tolist() == [1.0, 1.0] and out["scores"].tolist() == [3.0, 3.0, 2.0, 2.0]
    assert out["input_ids"][:, -3:].tolist() == [[57, 58, 1], [28, 28, 1], [28, 1, 0], [59, 60, 61]]


def test_max_length_cuts_the_start_of_each_prompt(odpo_tiny_model, odpo_fixed_generator):
    """max_length 6 keeps 6 - |y| prompt tokens per row: the "abcd" rows (|y| = 3) keep 'b' 'c' 'd', the "ab" rows
    keep both tokens. Column 0 is then attended by no row and is dropped. The reference scores the cut row exactly
    as a forward pass over the kept tokens alone."""
    _, ctx, _, out = rolled_out(odpo_tiny_model, odpo_fixed_generator, max_length=6)
    assert out["input_ids"].tolist() == [
        [0, 5, 6, 57, 58, 1],
        [6, 7, 8, 59, 60, 61],
        [0, 5, 6, 28, 1, 0],
        [6, 7, 8, 28, 28, 1],
    ]
    assert out["attention_mask"].tolist() == [
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    with torch.no_grad():
        ids = torch.tensor([[6, 7, 8, 59, 60, 61]])
        logps = torch.log_softmax(ctx.model(input_ids=ids).logits[0, 2:5].float(), -1)
        expected = logps.gather(1, ids[0, 3:, None]).sum()
    torch.testing.assert_close(out["ref_logps"][1], expected, rtol=1e-5, atol=1e-5)


def test_conversational_prompts_reach_the_judge_as_message_pairs(odpo_tiny_model, odpo_fixed_generator):
    """A judge sees one prompt per pair, [first, second] assistant messages, the columns and the token ids."""
    from posttrain.rewards import judge

    seen = {}

    @judge
    def recorder(prompts, completions, completion_ids, **columns):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, columns=columns)
        return [1, None]

    rows = [
        {"prompt": [{"role": "user", "content": "ab"}], "answer": "1"},
        {"prompt": [{"role": "user", "content": "cd"}], "answer": "2"},
    ]
    _, _, _, out = rolled_out(odpo_tiny_model, odpo_fixed_generator, rows, {"recorder": recorder}, judge="recorder")
    assert seen["prompts"] == [rows[0]["prompt"], rows[1]["prompt"]]
    assert seen["completions"][0] == [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "01"}]]
    assert seen["ids"] == [[[28, 1], [57, 58, 1]], [[59, 60, 61], [28, 28, 1]]] and seen["columns"] == {
        "answer": ["1", "2"]
    }
    assert out["winner"].tolist()[0] == 1.0 and torch.isnan(out["winner"][1]) and "scores" not in out


@pytest.mark.parametrize(
    ("rows", "problem"), [([{"prompt": "ab"}, {"text": "x"}], "row 1"), ([{"prompt": ""}], "row 0")]
)
def test_bad_rows_are_named(odpo_tiny_model, rows, problem):
    config = OnlineDPOConfig(model=str(odpo_tiny_model))
    ctx = TrainContext(config=config, tokenizer=AutoTokenizer.from_pretrained(odpo_tiny_model))
    with pytest.raises(DataError, match=problem) as info:
        OnlineDPO().prepare(datasets.Dataset.from_list(rows), ctx)
    assert "prompt" in str(info.value)
