"""Bad input, classes "configuration" and "options that would be ignored".

Every numeric field is checked: NaN and infinity for every float field of every method (a generic rule, so
plugins get it for free), ranges for seeds, probabilities and lengths. An option that would silently do
nothing on this machine (``fp16`` on a CPU, a ``report_to`` name nothing recognises, a split of a single
file) is refused before the model loads.
"""

from __future__ import annotations

import pytest
from bad_input_catalogue import LM, PAIRS, PROMPTS, Case, run_case, train

LM_FILE = {"lm.jsonl": LM}
D = ["--dataset", "{tmp}/lm.jsonl"]

CASES = [
    # -- keys, types and choices
    Case("unknown-key-suggests", train("sft", *D, "--learning_rat", "1e-3"), 2,
         ["unknown key 'learning_rat'"], ["did you mean 'learning_rate'?"], LM_FILE),
    Case("packing-with-a-method-that-cannot-pack", train("dpo", "--dataset", "{tmp}/pairs.jsonl", "--packing",
         "true"), 2, ["unknown key 'packing' for DPOConfig"], ["remove it", "`posttrain train dpo --help`"],
         {"pairs.jsonl": PAIRS}),
    Case("unknown-key-in-yaml", train("sft", "--config", "{tmp}/run.yaml", *D), 2,
         ["{tmp}/run.yaml", "unknown key 'max_step'"], ["did you mean 'max_steps'?"],
         {"run.yaml": "max_step: 3\n", **LM_FILE}),
    Case("wrong-type-flag", train("sft", *D, "--learning_rate", "fast"), 2,
         ["--learning_rate", "'fast'"], ["expected a number"], LM_FILE),
    Case("wrong-type-in-yaml", train("sft", "--config", "{tmp}/run.yaml", *D), 2,
         ["{tmp}/run.yaml", "warmup_steps"], ["expected an integer"], {"run.yaml": "warmup_steps: [1, 2]\n", **LM_FILE}),
    Case("choice-misspelt", train("sft", *D, "--lr_scheduler_type", "cosin"), 2,
         ["lr_scheduler_type", "'cosin'"], ["did you mean 'cosine'?"], LM_FILE),
    Case("config-file-missing", train("sft", "--config", "{tmp}/nope.yaml"), 2,
         ["'{tmp}/nope.yaml' does not exist"], ["--config"]),
    Case("config-not-a-mapping", train("sft", "--config", "{tmp}/run.yaml"), 2,
         ["{tmp}/run.yaml", "got list"], ["mapping of field: value"], {"run.yaml": "- a\n- b\n"}),
    Case("config-invalid-yaml", train("sft", "--config", "{tmp}/run.yaml"), 2,
         ["{tmp}/run.yaml is not valid YAML", "line 2"], ["expected ',' or ']'"], {"run.yaml": "a: 1\nb: [1, 2\n"}),
    Case("stray-positional-argument", train("sft", "--max_steps", "2", "extra"), 2, ["'extra'"],
         ["options look like --name value"]),
    # -- ranges and contradictions
    Case("negative-batch-size", train("sft", *D, "--per_device_train_batch_size", "-1"), 2,
         ["per_device_train_batch_size", "got -1"], ["must be >= 1"], LM_FILE),
    Case("zero-max-steps", train("sft", *D, "--max_steps", "0"), 2,
         ["max_steps", "got 0"], ["must be > 0 (or -1 to use num_train_epochs)"], LM_FILE),
    Case("zero-gradient-accumulation", train("sft", *D, "--gradient_accumulation_steps", "0"), 2,
         ["gradient_accumulation_steps", "got 0"], ["must be >= 1"], LM_FILE),
    Case("bf16-and-fp16", train("sft", *D, "--bf16", "--fp16"), 2, ["bf16 and fp16 are both true"], ["choose one"],
         LM_FILE),
    Case("packing-without-max-length", train("sft", *D, "--packing", "true", "--max_length", "null"), 2,
         ["packing is true but max_length is null"], ["so set it"], LM_FILE),
    # -- every number: NaN, infinity, ranges (generic rules reach method fields too)
    Case("nan-learning-rate", train("sft", *D, "--learning_rate", "nan"), 2,
         ["learning_rate must be a finite number, got nan"], [], LM_FILE),
    Case("infinite-max-grad-norm", train("sft", *D, "--max_grad_norm", "inf"), 2,
         ["max_grad_norm must be a finite number, got inf"], [], LM_FILE),
    Case("nan-in-yaml", train("sft", "--config", "{tmp}/run.yaml", *D), 2,
         ["{tmp}/run.yaml", "adam_epsilon must be a finite number, got nan"], [],
         {"run.yaml": "adam_epsilon: .nan\n", **LM_FILE}),
    Case("nan-method-field", train("dpo", "--dataset", "{tmp}/pairs.jsonl", "--beta", "nan"), 2,
         ["beta must be a finite number, got nan"], [], {"pairs.jsonl": PAIRS}),
    Case("nan-inside-a-list-field", train("dpo", "--dataset", "{tmp}/pairs.jsonl", "--loss_weights", "nan"), 2,
         ["loss_weights must be a finite number, got nan"], [], {"pairs.jsonl": PAIRS}),
    Case("negative-seed", train("sft", *D, "--seed", "-1"), 2, ["seed must be in [0, 2**32 - 1]", "got -1"], [],
         LM_FILE),
    Case("seed-too-large", train("sft", *D, "--seed", "4294967296"), 2, ["seed must be in [0, 2**32 - 1]"], [],
         LM_FILE),
    Case("probability-above-one", train("grpo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs", "accuracy",
         "--num_generations", "2", "--top_p", "1.5"), 2, ["top_p must be in", "got 1.5"], [], {"p.jsonl": PROMPTS}),
    Case("negative-dropout", train("sft", *D, "--lora_dropout", "-0.1"), 2, ["lora_dropout must be in [0, 1]"], [],
         LM_FILE),
    Case("adam-beta-of-one", train("sft", *D, "--adam_beta2", "1"), 2, ["adam_beta2 must be in [0, 1)", "got 1.0"],
         [], LM_FILE),
    Case("zero-temperature", train("grpo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs", "accuracy",
         "--num_generations", "2", "--temperature", "0"), 2, ["temperature must be > 0", "got 0.0"], [], {"p.jsonl": PROMPTS}),
    # -- reward lists: one check in posttrain.rewards, reached through every online method's config
    Case("grpo-reward-weights-count", train("grpo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs", "accuracy",
         "--reward_weights", "1.0,0.5", "--num_generations", "2"), 2,
         ["reward_weights has 2 values for 1 reward function (accuracy)"],
         ["give one weight per reward_funcs entry", "leave reward_weights unset"], {"p.jsonl": PROMPTS}),
    Case("rloo-reward-named-twice", train("rloo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs",
         "accuracy,accuracy", "--num_generations", "2"), 2, ["reward_funcs names 'accuracy' twice"],
         ["list each reward function once", "larger weight in reward_weights"], {"p.jsonl": PROMPTS}),
    Case("online-dpo-reward-list-both-problems", train("online-dpo", "--dataset", "{tmp}/p.jsonl", "--reward_funcs",
         "accuracy,accuracy", "--reward_weights", "1.0"), 2,
         ["2 problems", "reward_weights has 1 value for 2 reward functions", "reward_funcs names 'accuracy' twice"],
         [], {"p.jsonl": PROMPTS}),
    Case("max-length-holds-no-completion-token", train("sft", *D, "--max_length", "1"), 2,
         ["max_length must be >= 2", "one completion token"], [], LM_FILE),
    Case("every-problem-at-once", train("sft", *D, "--seed", "-3", "--learning_rate", "nan", "--adam_epsilon",
         "-1"), 2, ["3 problems", "seed", "learning_rate", "adam_epsilon must be >= 0"], [], LM_FILE),
    # -- options that would be ignored
    Case("report-to-misspelt", train("sft", *D, "--report_to", "tensorbord"), 2,
         ["report_to names 'tensorbord', which no installed plugin recognises"], ["did you mean 'tensorboard'?"],
         LM_FILE),
    Case("report-to-tracker-not-installed", train("sft", *D, "--report_to", "wandb"), 2,
         ["report_to names 'wandb'", "nothing would be logged there"], ["pip install 'posttrain-trackers[wandb]'"],
         LM_FILE, env={"POSTTRAIN_DISABLE_PLUGINS": "posttrain-trackers"}),
    Case("report-to-unknown-name", train("sft", *D, "--report_to", "carrier-pigeon"), 2,
         ["report_to names 'carrier-pigeon'"], ["install the plugin that provides it, or remove it"], LM_FILE),
    Case("report-to-none-with-others", train("sft", *D, "--report_to", "none,tensorboard"), 2,
         ["report_to lists 'none' together with other names"], ["give 'none' alone"], LM_FILE),
    Case("fp16-on-cpu", train("sft", *D, "--fp16", "true"), 2,
         ["fp16 is true but this run is on CPU", "would silently not apply"], ["drop --fp16", "--bf16 true"], LM_FILE),
    Case("dataset-split-of-a-single-file", train("sft", *D, "--dataset_split", "test"), 2,
         ["dataset_split is 'test'", "is a single file, which has no splits"], ["drop --dataset_split"], LM_FILE),
    Case("flash-attention-on-cpu", train("sft", *D, "--attn_implementation", "flash_attention_2"), 2,
         ["attn_implementation 'flash_attention_2' runs only on CUDA GPUs"], ["use sdpa"], LM_FILE),
    Case("attention-misspelt", train("sft", *D, "--attn_implementation", "spda"), 2,
         ["attn_implementation 'spda' is not an attention implementation"], ["did you mean 'sdpa'?"], LM_FILE),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_configuration_case(case, paths, watched, monkeypatch, no_model_load):
    """Configuration problems are all found before any model or tokenizer loads."""
    run_case(case, paths, monkeypatch, watched)


def test_generic_rules_cover_every_plugin_config():
    """NaN is refused for every float field of every installed method's config, with no code in the plugin (a
    method's own rule for the field, when it has one that NaN trips, is the message shown instead)."""
    import dataclasses
    import typing

    from posttrain import _discovery as discovery
    from posttrain import _registry as registry
    from posttrain._errors import ConfigError
    from posttrain.config import build_config

    checked = 0
    for entry in discovery.discover(("method",)):
        config_class = registry.load_method(entry).config_class
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if hints[f.name] in (float, float | None):
                with pytest.raises(ConfigError, match=rf"{f.name} must be .*got nan"):
                    build_config(config_class, {f.name: "nan"}, from_cli=True)
                checked += 1
    assert checked >= 50
