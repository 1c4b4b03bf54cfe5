"""Model, tokenizer, reference and teacher helpers."""

from __future__ import annotations

import pytest
import torch
from posttrain import models
from posttrain._errors import ConfigError, PosttrainError
from posttrain._method import TrainContext
from posttrain.config import TrainingConfig


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(PosttrainError, match="does not exist"):
        models.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PosttrainError, match="no config.json"):
        models.load_causal_lm(str(tmp_path / "empty"), TrainingConfig())
    with pytest.raises(ConfigError, match="pass --model PATH"):
        models.load_tokenizer("")


def test_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=50)).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(PosttrainError, match="cannot be loaded as AutoModelForCausalLM"):
        models.load_causal_lm(str(tmp_path / "bert"), TrainingConfig())


def test_tokenizer_without_pad_gets_eos(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    (tmp_path / "nopad" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    loaded = models.load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "<|end|>"


def test_reference_model_is_frozen_copy(tiny_model_dir):
    config = TrainingConfig(model=str(tiny_model_dir))
    policy = models.load_causal_lm(str(tiny_model_dir), config)
    ctx = TrainContext(config=config, model=policy, model_path=str(tiny_model_dir))
    ref = models.reference_model(ctx)
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters()) and not ref.training
    ids = torch.tensor([[5, 6, 7]])
    with models.reference_forward(policy, ref) as module:  # a copy of the same weights: the same arithmetic, bitwise
        assert torch.equal(module(ids).logits, policy(ids).logits)


def test_lora_reference_is_adapter_disabled_base(tiny_model_dir):
    pytest.importorskip("peft")
    config = TrainingConfig(model=str(tiny_model_dir), use_peft=True, lora_r=4)
    base_logits = models.load_causal_lm(str(tiny_model_dir), config)(torch.tensor([[5, 6, 7]])).logits
    policy = models.apply_peft(models.load_causal_lm(str(tiny_model_dir), config), config)
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    ctx = TrainContext(config=config, model=policy, model_path=str(tiny_model_dir))
    assert models.reference_model(ctx) is None
    with models.reference_forward(policy, None) as module:
        ref_logits = module(torch.tensor([[5, 6, 7]])).logits
    # With the adapter disabled, PEFT runs each wrapped layer's base layer alone: the base model's arithmetic, bitwise.
    assert torch.equal(ref_logits, base_logits)
    assert not torch.allclose(policy(torch.tensor([[5, 6, 7]])).logits, base_logits, atol=1e-3)  # moved by ~0.4


def test_disable_dropout_zeroes_every_dropout_module_and_nothing_else():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.2))
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    assert not torch.equal(model.train()(x), model.eval()(x))  # dropout is active in training mode
    models.disable_dropout(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
    assert torch.equal(model.train()(x), model.eval()(x))  # training-mode outputs are now deterministic
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched


def test_teacher_must_share_vocabulary(tmp_path, tiny_model_dir):
    from posttrain.testing import build_tiny_model, build_tokenizer

    config = TrainingConfig()
    student_tok = models.load_tokenizer(str(tiny_model_dir))
    teacher = models.load_teacher(str(tiny_model_dir), student_tok, config)
    assert not any(p.requires_grad for p in teacher.parameters())
    other = build_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(extra_characters="éü"))
    with pytest.raises(PosttrainError, match="different tokenizer vocabulary"):
        models.load_teacher(str(other), student_tok, config)


def test_tiny_model_takes_its_context_length_and_tokenizer(tmp_path):
    from posttrain.testing import build_tiny_model, build_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = build_tokenizer(extra_characters="éü")
    path = build_tiny_model(tmp_path / "long", tokenizer=tokenizer, max_position_embeddings=4096)
    config = AutoConfig.from_pretrained(path)
    assert config.max_position_embeddings == 4096 and config.vocab_size == len(tokenizer)
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
    assert AutoConfig.from_pretrained(build_tiny_model(tmp_path / "default")).max_position_embeddings == 512


def test_token_logps_matches_cross_entropy():
    from posttrain.ops import token_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    expected = -torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1), reduction="none", ignore_index=-100
    ).reshape(2, 5)
    # The same formula (log-softmax, pick the label) computed by another function: each value comes out of a
    # log-softmax over 11 logits (~12 roundings) of size |log p| + max |logit|; see posttrain.testing._rounding.
    from posttrain.testing._rounding import rounding_tolerance

    tolerance = rounding_tolerance(expected.abs() + logits.abs().amax(-1), 12)
    assert ((token_logps(logits, labels) - expected).abs() <= tolerance).all()
    assert (token_logps(logits, labels)[0, :2] == 0).all()


def test_padding_free_auto_is_always_on_under_a_varlen_kernel_and_per_batch_under_dense_attention(tiny_model_dir):
    """auto: "auto" (a choice per micro-batch, pack_batch) under sdpa and eager, where a packed row's attention grows
    with the square of its length; True under flash_attention_2/3 when the model passes the packed-attention check;
    true checks, false does nothing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert models.resolve_padding_free(model, False) is False
    assert models.resolve_padding_free(model, True) is True  # the check passes under sdpa
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        assert models.resolve_padding_free(model, "auto") == "auto"
    # flash attention needs CUDA; the check runs the model, so keep sdpa's kernels under flash's name
    model.config._attn_implementation = "sdpa"
    original = model.config

    class FlashNamed:
        def __getattr__(self, name):
            return "flash_attention_2" if name == "_attn_implementation" else getattr(original, name)

    model.config = FlashNamed()
    try:
        assert models.resolve_padding_free(model, "auto") is True
    finally:
        model.config = original


def _llama_config(layers: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
    )


# Micro-batches of benchmarks/padding_free.py (seed 0, batch 8) whose measured packed/padded CPU-time ratio was on
# the same side of 1 in every round on both models (docs/benchmarks.md, "Padding-free rows")
HEAVY_TAILED = [511, 98, 17, 213, 48, 36, 183, 271]  # log-normal, median 128
ONE_LONG = [126, 77, 87, 70, 109, 126, 80, 1024]  # short answers and one long document
NEAR_EQUAL = [111, 125, 111, 126, 117, 101, 105, 106]  # uniform 100-128
EQUAL = [128] * 8


@pytest.mark.parametrize("shape", [(4, 256), (4, 512)])
def test_pack_batch_packs_heavy_tailed_batches_and_keeps_near_equal_ones_padded(shape):
    config = _llama_config(*shape)
    for lengths in (HEAVY_TAILED, ONE_LONG):
        assert models.pack_batch(config, "auto", lengths) is True, lengths
    for lengths in (NEAR_EQUAL, EQUAL):
        assert models.pack_batch(config, "auto", lengths) is False, lengths
    # true and false are answered as they are, whatever the lengths
    assert models.pack_batch(config, True, EQUAL) is True
    assert models.pack_batch(config, False, HEAVY_TAILED) is False


def test_pack_batch_is_right_on_every_measured_micro_batch():
    """pack_batch's choice against the CPU timings it was calibrated and checked on (72 micro-batches, six Llama
    sizes, 3 interleaved rounds each; benchmarks/padding_free.py): where every round found one layout faster,
    auto picks that one. Changing the estimate's constants must keep this true (or come with new measurements)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks/results/cpu-2026-11-30-padding-free-auto.json"
    records = json.loads(path.read_text())
    assert len(records) == 72 and sum(not r["fitted"] for r in records) == 24
    wrong = []
    for r in records:
        ratios = [packed / padded for packed, padded in zip(r["packed_s"], r["padded_s"])]
        layers, hidden = (int(x) for x in r["model"].split("x"))
        choice = models.pack_batch(_llama_config(layers, hidden), "auto", r["lengths"])
        if (max(ratios) < 1 and not choice) or (min(ratios) > 1 and choice):
            wrong.append((r["model"], r["seed"], r["lengths"], ratios, choice))
    assert not wrong


def test_pack_batch_reads_an_attention_mask_and_counts_left_padding_in_the_width():
    """A mask gives each row's real tokens and the padded width; left-padded prompts followed by right-padded
    completions are wider than the longest sequence, which makes packing pay sooner."""
    import torch

    config = _llama_config(4, 256)
    mask = torch.zeros(8, 128, dtype=torch.long)
    for i, n in enumerate(NEAR_EQUAL):
        mask[i, :n] = 1
    assert models.pack_batch(config, "auto", mask) is models.pack_batch(config, "auto", NEAR_EQUAL) is False
    wide = torch.nn.functional.pad(mask, (256, 0))  # the same rows padded to 384 columns
    assert models.pack_batch(config, "auto", wide) is True
    assert models.pack_batch(config, "auto", NEAR_EQUAL, width=384) is True
    # a pure function of the lengths: the same answer however often, in whatever container
    assert {
        models.pack_batch(config, "auto", x) for x in (HEAVY_TAILED, tuple(HEAVY_TAILED), torch.tensor(HEAVY_TAILED))
    } == {True}


def test_pack_batch_reads_the_config_through_model_wrappers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapper = torch.nn.Module()  # like DDP: the model is .module and the wrapper has no .config
    wrapper.module = model
    for lengths in ([3, 40, 2, 5], [9, 10, 10, 8]):
        assert models.pack_batch(wrapper, "auto", lengths) == models.pack_batch(model.config, "auto", lengths)


def test_padding_free_auto_warns_and_stays_padded_when_the_model_fails_the_check(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def leaky(model, option="packing/padding_free"):
        raise ConfigError(f"{option} is true, but ... attend to each other")

    monkeypatch.setattr(models, "check_packed_attention", leaky)
    monkeypatch.setattr(models, "VARLEN_ATTENTION", (model.config._attn_implementation,))
    with pytest.warns(UserWarning, match="padding_free is auto: keeping padded batches"):
        assert models.resolve_padding_free(model, "auto") is False
    with pytest.raises(ConfigError, match="padding_free is true"):
        models.resolve_padding_free(model, True)
