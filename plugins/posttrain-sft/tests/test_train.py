"""SFT on a tiny Llama: packing is exact, the model memorises a small dataset, metrics, LoRA, checkpointing, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from posttrain import ConfigError, TrainContext
from posttrain.loop import train
from posttrain_sft import SFT, SFTConfig, prepare_rows
from posttrain_sft.method import check_packed_attention
from transformers import AutoModelForCausalLM

PLUGIN = Path(__file__).resolve().parents[1]
FACTS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
]
CAPITALS = [
    {
        "prompt": [{"role": "user", "content": f"Capital of {country}?"}],
        "completion": [{"role": "assistant", "content": city}],
    }
    for country, city in FACTS
]
TEXTS = [{"text": "the cat sat " * (1 + i % 4) + str(i)} for i in range(10)]


def run(model_dir, tmp_path, name, rows, **fields):
    base = dict(
        model=str(model_dir),
        output_dir=str(tmp_path / name),
        max_steps=3,
        learning_rate=1e-3,
        per_device_train_batch_size=len(rows),
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
        max_length=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(SFT(), SFTConfig(**{**base, **fields}), train_dataset=rows)


def losses(result):
    return [row["loss"] for row in result.log_history if "loss" in row]


# -- packing and padding-free are exact --------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_restarting_position_ids_give_the_same_logits_as_separate_sequences(sft_model_dir, attn):
    """transformers 5.24 builds a block-diagonal causal mask from position_ids restarts when no attention mask and
    no cache are passed, for sdpa and eager on CPU: each packed token's logits equal its own sequence's."""
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir, attn_implementation=attn).eval()
    torch.manual_seed(0)
    seqs = [torch.randint(5, 90, (n,)) for n in (7, 1, 5)]
    with torch.no_grad():
        separate = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=position_ids, use_cache=False).logits[0]
        leaky = model(input_ids=torch.cat(seqs)[None], use_cache=False).logits[0]
    assert (packed - separate).abs().max() < 1e-5
    assert (leaky - separate).abs().max() > 1e-2  # without the restarts, sequences would see each other


def test_a_model_that_ignores_position_restarts_is_refused(sft_model_dir):
    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(sft_model_dir)
    check_packed_attention(model)  # the real model passes
    with pytest.raises(ConfigError, match="lets sequences that share a row attend to each other"):
        check_packed_attention(IgnoresPositions(model))


def test_packed_and_padding_free_losses_equal_the_padded_loss(sft_model_dir, sft_tokenizer):
    """Same rows, one micro-batch each way: identical loss sum and loss-token count (float tolerance)."""
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir).eval()
    results = {}
    for name, fields in {
        "padded": {},
        "padding_free": {"padding_free": True},
        "packed": {"packing": True, "max_length": 64},
    }.items():
        method, ctx = SFT(), TrainContext(config=SFTConfig(**fields), tokenizer=sft_tokenizer, training=False)
        rows = method.prepare(datasets.Dataset.from_list(TEXTS), ctx)
        with torch.no_grad():
            out = method.loss(model, method.collate(rows, ctx), ctx)
        results[name] = (float(out.loss_sum), int(out.n_items), len(rows))
    (padded, n, _), (free, n_free, _), (packed, n_packed, bins) = results.values()
    assert n == n_free == n_packed
    assert bins < len(TEXTS)  # packing really merged rows
    assert abs(free - padded) / padded < 1e-6 and abs(packed - padded) / padded < 1e-6


def test_packed_training_follows_the_unpacked_run(sft_model_dir, sft_tokenizer, tmp_path):
    """Full batch, 3 steps: every sequence is in every step either way, so the per-step losses agree."""
    bins = prepare_rows(datasets.Dataset.from_list(TEXTS), sft_tokenizer, SFTConfig(packing=True, max_length=64))
    assert len(bins) < len(TEXTS)
    padded = losses(run(sft_model_dir, tmp_path, "padded", TEXTS))
    packed = losses(run(sft_model_dir, tmp_path, "packed", TEXTS, packing=True, per_device_train_batch_size=len(bins)))
    assert len(packed) == 3 and padded[0] != padded[2]
    assert max(abs(a - b) / a for a, b in zip(padded, packed)) < 1e-5, (padded, packed)


# -- learning ---------------------------------------------------------------------------------------------------


def test_sft_memorises_a_small_dataset(sft_model_dir, tmp_path):
    """8 capital-city completions, full batch, lr 1e-2 constant, 80 steps on the 25k-parameter tiny Llama.

    Threshold: the mean loss of steps 71-80 is below 0.1 nats per completion token (measured 0.0027) and every
    completion token is the argmax; steps 1-10 average about 3.4 nats (a random model starts near ln(100) = 4.6).
    """
    result = run(
        sft_model_dir,
        tmp_path,
        "memorise",
        CAPITALS,
        max_steps=80,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=10,
    )
    first, last = result.log_history[0], result.log_history[-1]
    assert first["loss"] > 2.0
    assert last["loss"] < 0.1, [round(r["loss"], 4) for r in result.log_history]
    assert last["mean_token_accuracy"] == 1.0
    assert last["entropy"] < first["entropy"]


# -- metrics ----------------------------------------------------------------------------------------------------


def test_num_tokens_is_the_running_total_through_accumulation_and_logging_windows(
    sft_model_dir, sft_tokenizer, tmp_path
):
    """Full batch split into 2 micro-batches, logged every 2 steps: each step trains on every token of the dataset
    once, so the logged num_tokens is step x (all non-padding tokens), as in TRL. It is a training count
    (``Metric.total``): evaluation rows do not report it."""
    total = sum(
        len(r["input_ids"])
        for r in prepare_rows(datasets.Dataset.from_list(TEXTS), sft_tokenizer, SFTConfig(max_length=64))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = SFTConfig(
            model=str(sft_model_dir),
            output_dir=str(tmp_path / "tokens"),
            max_steps=4,
            per_device_train_batch_size=5,
            gradient_accumulation_steps=2,
            logging_steps=2,
            save_steps=0,
            disable_progress_bar=True,
            max_length=64,
        )
        history = train(SFT(), config, train_dataset=TEXTS, eval_dataset=TEXTS[:3]).log_history
    logged = [(row["step"], row["num_tokens"]) for row in history if "loss" in row]
    assert logged == [(2, 2 * total), (4, 4 * total)]
    evaluation = history[-1]
    assert "eval_num_tokens" not in evaluation
    assert 0.0 <= evaluation["eval_mean_token_accuracy"] <= 1.0 and evaluation["eval_loss"] > 0


def test_num_tokens_continues_across_resume(sft_model_dir, tmp_path):
    """The loop saves the running total in the checkpoint; the resumed run logs what the uninterrupted one does."""
    import shutil

    fields = dict(max_steps=4, per_device_train_batch_size=5, logging_steps=2, save_steps=2)
    whole = run(sft_model_dir, tmp_path, "whole", TEXTS, **fields).log_history
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(sft_model_dir, tmp_path, "resumed", TEXTS, **fields, resume_from_checkpoint="latest").log_history
    expected = [(r["step"], r["num_tokens"]) for r in whole if "loss" in r]
    assert [(r["step"], r["num_tokens"]) for r in resumed if "loss" in r] == expected[1:]
    assert expected[1][1] > expected[0][1] > 0


def test_token_metrics_are_pooled_over_micro_batches(sft_model_dir, sft_tokenizer, logged):
    """One short row in a micro-batch and three long ones in another log what the four in one micro-batch do:
    accuracy and entropy are sums over loss tokens divided by their number (``Metric.ratio``), num_tokens a sum. A
    mean of the two micro-batch ratios would weight the short row's few tokens as much as the other 3 rows' many."""
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a model whose accuracy and entropy differ from token to token
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    ctx = TrainContext(config=SFTConfig(max_length=64), tokenizer=sft_tokenizer)
    method = SFT()
    rows = method.prepare(datasets.Dataset.from_list([{"text": "ab"}, *TEXTS[3:6]]), ctx)
    with torch.no_grad():
        together = logged(method.loss(model, method.collate(rows, ctx), ctx).metrics)
        parts = [method.loss(model, method.collate(part, ctx), ctx).metrics for part in (rows[:1], rows[1:])]
    apart = logged(*parts)
    assert together.keys() == apart.keys() == {"mean_token_accuracy", "entropy", "num_tokens"}
    for name, value in together.items():
        assert apart[name] == pytest.approx(value, rel=1e-6), name
    mean_of_ratios = sum(logged(part)["entropy"] for part in parts) / 2
    assert abs(mean_of_ratios - together["entropy"]) > 1e-3 * together["entropy"]  # the grouping would matter


# -- LoRA, gradient checkpointing, the command line ------------------------------------------------------------


def test_lora_trains_adapters_through_core(sft_model_dir, tmp_path):
    result = run(
        sft_model_dir,
        tmp_path,
        "lora",
        CAPITALS,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
        max_steps=4,
    )
    assert losses(result)[-1] < losses(result)[0]
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


def test_gradient_checkpointing_changes_no_number(sft_model_dir, tmp_path):
    plain = losses(run(sft_model_dir, tmp_path, "plain", CAPITALS, max_steps=2))
    checkpointed = losses(run(sft_model_dir, tmp_path, "ckpt", CAPITALS, max_steps=2, gradient_checkpointing=True))
    assert max(abs(a - b) / a for a, b in zip(plain, checkpointed)) < 1e-6


def test_the_yaml_example_runs_from_the_command_line(sft_model_dir, tmp_path):
    """configs/tiny.yaml with the command its first comment gives (plus a short max_steps), in a fresh process."""
    yaml_path = PLUGIN / "configs" / "tiny.yaml"
    first_comment = yaml_path.read_text().splitlines()[0]
    assert first_comment.startswith("# posttrain train sft --config plugins/posttrain-sft/configs/tiny.yaml")
    # The command runs from the repository root, where plugins/posttrain-sft/... resolves; a link makes that
    # true from an unpacked sdist too.
    (tmp_path / "root" / "plugins").mkdir(parents=True)
    (tmp_path / "root" / "plugins" / "posttrain-sft").symlink_to(PLUGIN, target_is_directory=True)
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "posttrain", "train", "sft", "--config", str(yaml_path)]
    command += ["--model", str(sft_model_dir), "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1"]
    command += ["--disable_progress_bar", "true"]
    done = subprocess.run(command, cwd=tmp_path / "root", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "grad_norm", "learning_rate", "mean_token_accuracy", "entropy", "num_tokens"} <= set(rows[0])
