"""Distillation data: tokenization, exact collator tensors, row-level errors, config checks, the teacher check."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, PosttrainError, TrainContext
from posttrain.config import build_config, load_config
from posttrain_distill import Distill, DistillConfig
from posttrain_distill.data import collate_rows, tokenize_row


@pytest.fixture
def distill_tokenizer():
    from posttrain.testing import build_tokenizer

    return build_tokenizer()


def test_tokenize_standard_rows(distill_tokenizer):
    """'ab' -> [5, 6]; completion 'b' gets EOS (id 1); prompt-only rows have no completion_ids."""
    assert tokenize_row({"prompt": "ab", "completion": "b"}, distill_tokenizer, 8) == {
        "prompt_ids": [5, 6],
        "completion_ids": [6, 1],
    }
    assert tokenize_row({"prompt": "ab"}, distill_tokenizer, 8) == {"prompt_ids": [5, 6]}
    assert tokenize_row({"prompt": "a", "completion": "bcd"}, distill_tokenizer, 2)["completion_ids"] == [6, 7]


def test_tokenize_conversational_rows_use_the_generation_prompt(distill_tokenizer):
    user, assistant, end = (
        distill_tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>")
    )
    prompt = [{"role": "user", "content": "a"}]
    assert tokenize_row({"prompt": prompt}, distill_tokenizer, 8) == {"prompt_ids": [user, 5, end, assistant]}
    out = tokenize_row({"prompt": prompt, "completion": [{"role": "assistant", "content": "b"}]}, distill_tokenizer, 8)
    assert out == {"prompt_ids": [user, 5, end, assistant], "completion_ids": [6, end]}


def test_collate_left_pads_prompts_and_right_pads_completions():
    rows = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4], "index": 7},
        {"prompt_ids": [5], "completion_ids": [6, 7, 8], "index": 2},
    ]
    batch = collate_rows(rows, pad_id=0)
    torch.testing.assert_close(batch["row_index"], torch.tensor([7, 2]))
    torch.testing.assert_close(batch["prompt_ids"], torch.tensor([[1, 2, 3], [0, 0, 5]]))
    torch.testing.assert_close(batch["prompt_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    torch.testing.assert_close(batch["completion_ids"], torch.tensor([[4, 0, 0], [6, 7, 8]]))
    torch.testing.assert_close(batch["completion_mask"], torch.tensor([[1, 0, 0], [1, 1, 1]]))
    only_prompts = collate_rows([{"prompt_ids": [1]}, {"prompt_ids": [2, 3]}], pad_id=0)
    assert set(only_prompts) == {"prompt_ids", "prompt_mask", "row_index"}


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "a", "completion": ""}, "completion"),
        ({"prompt": "", "completion": "b"}, "prompt"),
        ({"prompt": 3, "completion": "b"}, "prompt"),
    ],
)
def test_bad_rows_raise_data_error_naming_row_and_field(distill_tokenizer, row, field):
    data = [{"prompt": "a", "completion": "b"}] * 2 + [row]
    ctx = TrainContext(config=DistillConfig(teacher_model="t"), tokenizer=distill_tokenizer)
    with pytest.raises(DataError, match=rf"row 2 .*'{field}'"):
        Distill().prepare(data, ctx)


def test_mixed_strings_and_messages_in_a_row_are_refused(distill_tokenizer):
    data = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}]
    ctx = TrainContext(config=DistillConfig(teacher_model="t"), tokenizer=distill_tokenizer)
    with pytest.raises(DataError, match=r"row 1 .*'completion' is messages but 'prompt' is a string"):
        Distill().prepare(data, ctx)


def test_prompt_only_data_needs_lmbda_1(distill_tokenizer):
    data = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    ctx = TrainContext(config=DistillConfig(teacher_model="t", lmbda=0.5), tokenizer=distill_tokenizer)
    with pytest.raises(ConfigError, match=r"lmbda=0.5 .* prompt-only"):
        Distill().prepare(data, ctx)
    ctx.config.lmbda = 1.0
    assert Distill().prepare(data, ctx) == [{"prompt_ids": [5], "index": 0}, {"prompt_ids": [6], "index": 1}]


def test_config_problems():
    with pytest.raises(ConfigError) as err:
        build_config(DistillConfig, {"beta": 1.5, "lmbda": -0.1, "temperature": 0, "top_k": -1})
    text = str(err.value)
    for needle in (
        "teacher_model is required",
        "beta must be in [0, 1]",
        "lmbda must be in [0, 1]",
        "temperature must be > 0",
        "top_k must be >= 0",
    ):
        assert needle in text, needle
    assert build_config(DistillConfig, {"teacher_model": "t"}).beta == 1.0  # TRL's default: reverse KL


def test_an_environment_is_refused():
    """The forwards attend to the model's tokens only, so an episode's observations would be invisible."""
    with pytest.raises(ConfigError, match="environment \\('calculator'\\) is not supported by distill yet"):
        build_config(DistillConfig, {"teacher_model": "t", "environment": "calculator"})


def test_teacher_with_another_vocabulary_is_refused(distill_student_dir, tmp_path):
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.testing import build_tiny_model, build_tokenizer

    other = build_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(extra_characters="éü"))
    config = DistillConfig(model=str(distill_student_dir), teacher_model=str(other))
    ctx = TrainContext(
        config=config,
        tokenizer=load_tokenizer(str(distill_student_dir)),
        model=load_causal_lm(str(distill_student_dir), config),
    )
    with pytest.raises(PosttrainError, match="different tokenizer vocabulary"):
        Distill().setup(ctx)


def test_shipped_yaml_loads_and_its_data_prepares(distill_tokenizer):
    root = Path(__file__).resolve().parents[1]
    config = load_config(DistillConfig, root / "configs" / "tiny.yaml", {"model": "s", "teacher_model": "t"})
    assert config.lmbda == 0.5 and config.max_steps > 0
    dataset = datasets.load_dataset("json", data_files=str(root / "configs" / "tiny.jsonl"), split="train")
    rows = Distill().prepare(dataset, TrainContext(config=config, tokenizer=distill_tokenizer))
    assert len(rows) >= config.per_device_train_batch_size and all("completion_ids" in r for r in rows)
