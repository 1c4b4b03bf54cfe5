"""KTO data: unpairing, tokenization, exact collator tensors, the balance warning, row-level errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem, TrainContext
from posttrain.config import build_config, load_config
from posttrain_kto import KTO, KTOBalanceWarning, KTOConfig, balance_warning, unpair_preference
from posttrain_kto.data import collate_rows, fix_kl_partners, tokenize_row


def ctx_for(tokenizer, **fields) -> TrainContext:
    return TrainContext(config=KTOConfig(**fields), tokenizer=tokenizer)


def test_unpair_preference_gives_one_desirable_and_one_undesirable_row_per_pair():
    rows = [
        {"prompt": "P1", "chosen": "c1", "rejected": "r1", "source": "x"},
        {"prompt": "P2", "chosen": "c2", "rejected": "r2", "source": "y"},
    ]
    assert unpair_preference(rows) == [
        {"source": "x", "prompt": "P1", "completion": "c1", "label": True},
        {"source": "y", "prompt": "P2", "completion": "c2", "label": True},
        {"source": "x", "prompt": "P1", "completion": "r1", "label": False},
        {"source": "y", "prompt": "P2", "completion": "r2", "label": False},
    ]


def test_unpair_preference_extracts_implicit_prompts():
    rows = [{"chosen": "The sky is blue", "rejected": "The sky is green"}]
    assert unpair_preference(rows) == [
        {"prompt": "The sky is", "completion": " blue", "label": True},
        {"prompt": "The sky is", "completion": " green", "label": False},
    ]


def test_tokenize_row_appends_eos_to_standard_completions(kto_tokenizer):
    """'ab' -> [5, 6]; completion 'b' -> [6] + EOS (id 1); a completion already ending in EOS keeps one."""
    assert tokenize_row({"prompt": "ab", "completion": "b", "label": True}, kto_tokenizer) == {
        "prompt_ids": [5, 6],
        "completion_ids": [6, 1],
        "label": True,
    }
    again = tokenize_row({"prompt": "ab", "completion": "b<|end|>", "label": False}, kto_tokenizer)
    assert again["completion_ids"] == [6, 1] and again["label"] is False


def test_tokenize_row_conversational_uses_the_chat_template(kto_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "a"}],
        "completion": [{"role": "assistant", "content": "b"}],
        "label": True,
    }
    out = tokenize_row(row, kto_tokenizer)
    user, assistant, end = (kto_tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    assert out["prompt_ids"] == [user, 5, end, assistant]
    assert out["completion_ids"] == [6, end]


ROWS = [  # prepared rows, deliberately out of index order
    {"index": 2, "prompt_ids": [7, 8], "completion_ids": [9], "label": False},
    {"index": 0, "prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
    {"index": 1, "prompt_ids": [6], "completion_ids": [10, 11, 12], "label": True},
]


def test_collate_exact_tensors_with_rotated_kl_pairs():
    """Rows are sorted by index; row i's KL sequence is its prompt + the previous row's completion (last for row 0)."""
    batch = collate_rows(ROWS, pad_id=0, max_length=None, with_kl=True)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 3, 4, 5], [6, 10, 11, 12, 0], [7, 8, 9, 0, 0]]))
    torch.testing.assert_close(
        batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    )
    torch.testing.assert_close(
        batch["completion_mask"], torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    )
    torch.testing.assert_close(batch["labels"], torch.tensor([True, True, False]))
    # KL: prompt 0 + completion 2, prompt 1 + completion 0, prompt 2 + completion 1
    torch.testing.assert_close(
        batch["kl_input_ids"], torch.tensor([[1, 2, 3, 9, 0], [6, 4, 5, 0, 0], [7, 8, 10, 11, 12]])
    )
    torch.testing.assert_close(
        batch["kl_attention_mask"], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    )
    torch.testing.assert_close(
        batch["kl_completion_mask"], torch.tensor([[0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    )


def test_collate_truncates_to_max_length_keeping_the_start():
    batch = collate_rows(ROWS, pad_id=0, max_length=3, with_kl=False)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 3], [6, 10, 11], [7, 8, 9]]))
    torch.testing.assert_close(batch["completion_mask"], torch.tensor([[0, 0, 0], [0, 1, 1], [0, 0, 1]]))
    assert "kl_input_ids" not in batch  # apo_zero_unpaired needs no mismatched pairs


def test_fixed_kl_partners_and_precomputed_columns():
    rows = [dict(r) for r in sorted(ROWS, key=lambda r: r["index"])]
    fix_kl_partners(rows)
    assert [r["kl_completion_ids"] for r in rows] == [[9], [4, 5], [10, 11, 12]]
    for r in rows:
        r["ref_logps"], r["ref_kl_logps"] = -float(r["index"]), 0.5
    batch = collate_rows(list(reversed(rows)), pad_id=0, max_length=None, with_kl=True)
    torch.testing.assert_close(
        batch["kl_input_ids"], torch.tensor([[1, 2, 3, 9, 0], [6, 4, 5, 0, 0], [7, 8, 10, 11, 12]])
    )
    torch.testing.assert_close(batch["ref_logps"], torch.tensor([0.0, -1.0, -2.0]))
    torch.testing.assert_close(batch["ref_kl_logps"], torch.full((3,), 0.5))


def test_balance_warning_gives_the_weights_that_fix_it():
    """30 desirable vs 10 undesirable at weights 1/1: ratio 3. lambda_D = 10/30 = 1/3 gives ratio 1 and
    4/9 gives 4/3; or lambda_U = 30/10 = 3 gives 1 and 3 * 3/4 = 2.25 gives 4/3."""
    text = balance_warning(30, 10, 1.0, 1.0)
    assert "ratio of 3" in text and "[1, 4/3]" in text
    assert "desirable_weight in [0.3333, 0.4444]" in text and "undesirable_weight in [2.25, 3]" in text
    assert balance_warning(10, 10, 1.0, 1.0) is None  # ratio 1
    assert balance_warning(10, 10, 1.3, 1.0) is None  # ratio 1.3 <= 4/3
    few = balance_warning(10, 40, 1.0, 1.0)  # ratio 0.25: lambda_D in [4, 16/3] or lambda_U in [3/16, 1/4]
    assert "desirable_weight in [4, 5.333]" in few and "undesirable_weight in [0.1875, 0.25]" in few
    assert "no undesirable (label false) rows" in balance_warning(5, 0, 1.0, 1.0)


def test_prepare_warns_once_about_balance_and_unpairs_preference_rows(kto_tokenizer):
    paired = datasets.Dataset.from_list([{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)])
    method, ctx = KTO(), ctx_for(kto_tokenizer, desirable_weight=2.0)
    with pytest.warns(KTOBalanceWarning, match="ratio of 2"):
        rows = method.prepare(paired, ctx)
    assert [r["label"] for r in rows] == [True] * 3 + [False] * 3 and [r["index"] for r in rows] == list(range(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second preparation (evaluation data) does not warn again
        method.prepare(paired, ctx)


def test_prepare_drops_rows_whose_prompt_fills_max_length(kto_tokenizer):
    data = datasets.Dataset.from_list(
        [{"prompt": "abcdef", "completion": "x", "label": True}, {"prompt": "ab", "completion": "x", "label": False}]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = KTO().prepare(data, ctx_for(kto_tokenizer, max_length=6))
    assert any("dropped 1 of 2 rows whose prompt alone has >= max_length=6" in str(w.message) for w in caught)
    assert [r["prompt_ids"] for r in rows] == [[5, 6]]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "a", "completion": "b", "label": None}, "label"),
        ({"prompt": "a", "completion": "b", "label": "yes"}, "label"),
        ({"prompt": "a", "completion": "", "label": True}, "completion"),
    ],
)
def test_bad_rows_raise_data_error_naming_row_and_field(kto_tokenizer, row, field):
    data = [{"prompt": "a", "completion": "b", "label": True}] * 2 + [row]  # a list: Arrow would reject "yes"
    with pytest.raises(DataError, match=rf"row 2 .*'{field}'"):
        KTO().prepare(data, ctx_for(kto_tokenizer))


def test_mixed_strings_and_messages_in_a_row_are_refused(kto_tokenizer):
    data = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": [{"role": "user", "content": "a"}], "completion": "b", "label": False},
    ]
    with pytest.raises(DataError, match=r"row 1 .*'completion' is a string but 'prompt' is messages"):
        KTO().prepare(data, ctx_for(kto_tokenizer))


def test_prepare_refuses_exactly_the_rows_check_rows_reports(kto_tokenizer):
    """check-data (no model, no tokenizer) and training agree: every bad row, core's problems and KTO's own."""
    messages = [{"role": "user", "content": "a"}]
    good = {"prompt": "a", "completion": "b", "label": True}
    data = [
        good,
        {"prompt": messages, "completion": "b", "label": False},
        {"prompt": "a", "completion": "b", "label": "yes"},
        good,
        {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True},
    ]
    reported = KTO().check_rows(data)
    assert [(p.row, p.field) for p in reported] == [(1, "completion"), (2, "label"), (4, "completion")]
    assert all(isinstance(p, RowProblem) for p in reported)
    with pytest.raises(DataError) as info:
        KTO().prepare(data, ctx_for(kto_tokenizer))
    assert info.value.problems == reported and info.value.method == "kto"
    assert "(2 more problems in other rows.)" in str(info.value) and "posttrain check-data kto" in str(info.value)
    assert KTO().check_rows([good, good]) == []


def test_implicit_prompt_rows_mixing_kinds_are_refused(kto_tokenizer):
    """Without a prompt, chosen and rejected must be the same kind: the implicit prompt is their common start."""
    data = [
        {"chosen": "Q: yes", "rejected": "Q: no"},
        {"chosen": "Q: yes", "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    assert [(p.row, p.field, p.problem) for p in KTO().check_rows(data)] == [
        (1, "rejected", "is messages but 'chosen' is a string")
    ]
    with pytest.raises(DataError, match=r"row 1 of the dataset: field 'rejected' is messages"):
        KTO().prepare(data, ctx_for(kto_tokenizer))


def test_config_problems():
    with pytest.raises(ConfigError) as err:
        build_config(KTOConfig, {"beta": 0, "undesirable_weight": -1, "per_device_train_batch_size": 1})
    text = str(err.value)
    assert "beta must be > 0" in text and "undesirable_weight must be > 0" in text
    assert "per_device_train_batch_size must be >= 2" in text
    build_config(KTOConfig, {"per_device_train_batch_size": 1, "loss_type": "apo_zero_unpaired"})  # no KL point
    with pytest.raises(ConfigError, match="did you mean 'kto'"):
        build_config(KTOConfig, {"loss_type": "kt"})


def test_shipped_yaml_loads_and_its_data_prepares(kto_tokenizer):
    root = Path(__file__).resolve().parents[1]
    config = load_config(KTOConfig, root / "configs" / "tiny.yaml", {"model": "unused"})
    assert config.loss_type == "kto" and config.max_steps > 0
    dataset = datasets.load_dataset("json", data_files=str(root / "configs" / "tiny.jsonl"), split="train")
    rows = KTO().prepare(dataset, TrainContext(config=config, tokenizer=kto_tokenizer))
    assert len(rows) >= config.per_device_train_batch_size * config.gradient_accumulation_steps
