"""data.py: exact token ids, loss masks, packing bins and collated tensors; each bad row raises an error naming it.

The tiny tokenizer is character-level: <pad>=0, <|end|>=1 (EOS), <|user|>=3, <|assistant|>=4, 'a'=5, 'b'=6, ...
Its chat template renders ``<|role|>content<|end|>`` and wraps assistant content + <|end|> in {% generation %}.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError, RowProblem
from posttrain_sft import SFT, SFTConfig, collate, pack_bfd, prepare_rows

X = -100  # IGNORE_INDEX
END, USER, ASSISTANT = 1, 3, 4


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def prepare(rows, tokenizer, **fields):
    return prepare_rows(datasets.Dataset.from_list(rows), tokenizer, SFTConfig(**fields))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- language modeling ---------------------------------------------------------------------------------


def test_standard_text_gets_eos_appended_once_and_every_token_carries_loss(sft_tokenizer):
    rows = prepare([{"text": "ab"}, {"text": "ba<|end|>"}], sft_tokenizer)
    assert rows == [
        {"input_ids": [5, 6, END], "labels": [5, 6, END]},
        {"input_ids": [6, 5, END], "labels": [6, 5, END]},
    ]


def test_dataset_text_field_names_the_text_column(sft_tokenizer):
    rows = prepare([{"body": "ab", "text": "ignored"}], sft_tokenizer, dataset_text_field="body")
    assert rows[0]["input_ids"] == [5, 6, END]
    with pytest.raises(DataError, match="dataset_text_field is 'content'"):
        prepare([{"text": "ab"}], sft_tokenizer, dataset_text_field="content")


def test_conversation_trains_on_every_token_by_default(sft_tokenizer):
    rows = prepare([{"messages": [user("hi"), assistant("ok")]}], sft_tokenizer)
    expected = [USER, *ids(sft_tokenizer, "hi"), END, ASSISTANT, *ids(sft_tokenizer, "ok"), END]
    assert rows[0] == {"input_ids": expected, "labels": expected}


def test_assistant_only_loss_keeps_exactly_the_assistant_content_and_its_end_token(sft_tokenizer):
    """Two turns: <|user|> h i <|end|> <|assistant|> o k <|end|> <|user|> x <|end|> <|assistant|> y z <|end|>.
    The generation blocks cover positions 5-7 and 12-14; role tokens and user turns carry no loss."""
    rows = prepare(
        [{"messages": [user("hi"), assistant("ok"), user("x"), assistant("yz")]}],
        sft_tokenizer,
        assistant_only_loss=True,
    )
    labels = rows[0]["labels"]
    assert [i for i, t in enumerate(labels) if t != X] == [5, 6, 7, 12, 13, 14]
    assert [labels[i] for i in (5, 6, 7, 12, 13, 14)] == [
        *ids(sft_tokenizer, "ok"),
        END,
        *ids(sft_tokenizer, "yz"),
        END,
    ]


# -- prompt-completion -------------------------------------------------------------------------------------


def test_standard_prompt_completion_masks_the_prompt_by_default(sft_tokenizer):
    rows = prepare([{"prompt": "ab", "completion": "ba"}], sft_tokenizer)
    assert rows[0] == {"input_ids": [5, 6, 6, 5, END], "labels": [X, X, 6, 5, END]}


def test_completion_only_loss_false_trains_on_the_prompt_too(sft_tokenizer):
    rows = prepare([{"prompt": "ab", "completion": "ba"}], sft_tokenizer, completion_only_loss=False)
    assert rows[0]["labels"] == [5, 6, 6, 5, END]


def test_conversational_prompt_completion_masks_the_prompt_and_the_generation_prompt(sft_tokenizer):
    """Prompt rendered with add_generation_prompt: <|user|> h i <|end|> <|assistant|> (5 tokens); loss on o k <|end|>."""
    rows = prepare([{"prompt": [user("hi")], "completion": [assistant("ok")]}], sft_tokenizer)
    assert rows[0]["input_ids"] == [USER, 12, 13, END, ASSISTANT, 19, 15, END]
    assert rows[0]["labels"] == [X, X, X, X, X, 19, 15, END]


def test_both_masks_apply_together(sft_tokenizer):
    """A completion holding a user turn between two assistant turns: completion-only keeps it, assistant-only drops it."""
    row = {"prompt": [user("a")], "completion": [assistant("b"), user("c"), assistant("d")]}
    rows = prepare([row], sft_tokenizer, assistant_only_loss=True)
    # <|user|> a <|end|> <|assistant|> b <|end|> <|user|> c <|end|> <|assistant|> d <|end|>
    assert [i for i, t in enumerate(rows[0]["labels"]) if t != X] == [4, 5, 10, 11]


def test_a_prompt_rendered_differently_alone_starts_the_completion_where_tokens_diverge(sft_tokenizer):
    """A template whose generation prompt ends in a newline the full conversation lacks: the prompt alone is
    <|user|> a <|end|> <|assistant|> \\n, the conversation <|user|> a <|end|> <|assistant|> b <|end|>. They share 4
    tokens, so the loss starts at 'b' (TRL's common-prefix rule), with one warning for all such rows."""
    from posttrain.testing import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = sft_tokenizer.chat_template.replace(
        "'<|assistant|>' }}{% endif %}", "'<|assistant|>\\n' }}{% endif %}"
    )
    rows = [{"prompt": [user("a")], "completion": [assistant("b")]}] * 3
    with pytest.warns(UserWarning, match=r"3 rows \(first: row 0\) tokenize their prompt differently"):
        out = prepare(rows, tokenizer)
    assert out[0]["labels"] == [X, X, X, X, 6, END]


# -- truncation and packing -----------------------------------------------------------------------------------


def test_max_length_keeps_the_start_and_drops_rows_left_without_loss(sft_tokenizer):
    rows = [{"prompt": "abcdef", "completion": "a"}, {"prompt": "a", "completion": "bcdef"}]
    with pytest.warns(UserWarning, match="1 of 2 rows have no loss token"):
        out = prepare(rows, sft_tokenizer, max_length=4)
    assert out == [{"input_ids": [5, 6, 7, 8], "labels": [X, 6, 7, 8]}]


def test_pack_bfd_matches_trls_best_fit_decreasing_example():
    """TRL's pack_dataset docstring: lengths (4, 2, 3, 1) into bins of 4 -> [[0], [2, 3], [1]]."""
    assert pack_bfd([4, 2, 3, 1], 4) == [[0], [2, 3], [1]]
    # best fit, not first fit: 3 goes into the bin with 3 free (not the one with 5); ties go to the older bin
    assert pack_bfd([5, 7, 3, 2, 2], 10) == [[1, 2], [0, 3, 4]]
    assert pack_bfd([2, 2, 2], 3) == [[0], [1], [2]]


def test_packing_cuts_each_sequence_to_max_length_then_bins_whole_sequences(sft_tokenizer):
    rows = [{"text": "abcdef"}, {"text": "a"}, {"text": "ab"}]  # 7, 2, 3 tokens with EOS
    out = prepare(rows, sft_tokenizer, packing=True, max_length=5)
    assert out == [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [5]},
        {"input_ids": [5, 6, END, 5, END], "labels": [5, 6, END, 5, END], "seq_lengths": [3, 2]},
    ]


# -- collation --------------------------------------------------------------------------------------------------


def test_collate_pads_right_with_masked_labels():
    rows = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = collate(rows, pad_token_id=0, padding_free=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3], [4, 5, X]]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_collate_padding_free_flattens_with_position_restarts_and_masks_each_first_token():
    rows = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = collate(rows, pad_token_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[X, 2, 3, X, 5]]
    assert "attention_mask" not in batch


def test_collate_packed_rows_restart_positions_at_every_sequence():
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "seq_lengths": [3, 1]},
        {"input_ids": [5, 6], "labels": [5, 6], "seq_lengths": [2]},
    ]
    batch = collate(rows, pad_token_id=0, padding_free=True)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["labels"].tolist() == [[X, 2, 3, X, X, 6]]
    assert batch["input_ids"].dtype == torch.long


# -- errors -----------------------------------------------------------------------------------------------------


def test_a_row_without_its_field_is_named(sft_tokenizer):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]
    with pytest.raises(DataError, match=r"row 1 .*'completion'"):
        prepare(rows, sft_tokenizer)


def test_a_message_with_an_unknown_role_is_named(sft_tokenizer):
    rows = [{"messages": [user("a")]}, {"messages": [{"role": "robot", "content": "b"}]}]
    with pytest.raises(DataError, match=r"row 1 .*'messages'.*robot"):
        prepare(rows, sft_tokenizer)


def test_assistant_only_loss_on_standard_text_names_every_row(sft_tokenizer):
    with pytest.raises(DataError) as info:
        prepare([{"text": "ab"}, {"text": "ba"}], sft_tokenizer, assistant_only_loss=True)
    assert [(p.row, p.field) for p in info.value.problems] == [(0, "text"), (1, "text")]
    assert "row 0 of the dataset: field 'text' is standard text, but assistant_only_loss is true" in str(info.value)
    assert "(1 more problem in other rows.)" in str(info.value) and "posttrain check-data sft" in str(info.value)


def test_assistant_only_loss_on_a_conversation_without_assistant_names_the_row(sft_tokenizer):
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [user("a")]}]
    with pytest.raises(DataError, match=r"row 1 of the dataset: field 'messages' has no token .* assistant's"):
        prepare(rows, sft_tokenizer, assistant_only_loss=True)


def test_prepare_refuses_exactly_the_rows_check_rows_reports(sft_ctx):
    """check-data (no model, no tokenizer) and training agree: core's format problems plus rows mixing kinds."""
    good = {"prompt": "a", "completion": "b"}
    rows = [
        good,
        {"prompt": [user("a")], "completion": "b"},
        {"prompt": "a", "completion": None},
        good,
        {"prompt": "a", "completion": [assistant("b")]},
    ]
    reported = SFT().check_rows(rows)
    assert [(p.row, p.field) for p in reported] == [(1, "completion"), (2, "completion"), (4, "completion")]
    assert reported[0] == RowProblem(
        1, "completion", "is a string while 'prompt' is a list of messages", reported[0].fix
    )
    assert reported[1].problem == "is missing"  # core's format check
    assert reported[2].problem == "is a list of messages while 'prompt' is a string"
    with pytest.raises(DataError) as info:
        SFT().prepare(rows, sft_ctx())
    assert info.value.problems == reported and info.value.method == "sft"
    assert SFT().check_rows([good, good]) == [] and len(SFT().prepare([good, good], sft_ctx())) == 2


def test_assistant_only_loss_needs_generation_markers(sft_tokenizer):
    from posttrain.testing import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = sft_tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    with pytest.raises(ConfigError, match=r"no \{% generation %\} markers"):
        prepare([{"messages": [user("a"), assistant("b")]}], tokenizer, assistant_only_loss=True)


def test_conversations_need_a_chat_template():
    from posttrain.testing import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        prepare([{"messages": [user("a"), assistant("b")]}], tokenizer)


def test_completion_only_loss_on_language_modeling_data_is_refused(sft_tokenizer):
    with pytest.raises(ConfigError, match="completion_only_loss is true but the dataset is language modeling"):
        prepare([{"text": "ab"}], sft_tokenizer, completion_only_loss=True)


def test_config_problems_are_reported():
    from posttrain.config import build_config

    with pytest.raises(ConfigError, match="packing is true but max_length is null"):
        build_config(SFTConfig, {"packing": True, "max_length": None})
    with pytest.raises(ConfigError, match="max_length must be >= 1"):
        build_config(SFTConfig, {"max_length": 0})
    with pytest.raises(ConfigError, match="did you mean 'loss_type'"):
        build_config(SFTConfig, {"los_type": "nll"})
