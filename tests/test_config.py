"""Config loading: YAML + CLI, types, unknown keys with suggestions, every problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from posttrain._errors import ConfigError
from posttrain.config import (
    TrainingConfig,
    build_config,
    describe_fields,
    load_config,
    parse_cli_overrides,
    save_config,
)


@dataclass
class DemoConfig(TrainingConfig):
    beta: float = 0.1  # KL strength
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"  # which loss
    reward_funcs: list[str] | None = None  # rewards by name
    reward_weights: list[float] | None = None  # one weight per reward


def test_cli_overrides_parse_flags_and_values():
    assert parse_cli_overrides(["--a", "1", "--flag", "--b=x y", "--c", "true", "--d-e", "2"]) == {
        "a": "1",
        "flag": True,
        "b": "x y",
        "c": "true",
        "d_e": "2",
    }
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_cli_overrides(["oops"])


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-5\nbeta: 0.5\nreport_to: [tensorboard]\nloss_type: hinge\n")
    config = load_config(
        DemoConfig,
        path,
        {
            "beta": "0.25",
            "bf16": "false",
            "reward_funcs": "accuracy,format",
            "reward_weights": "1.0,0.2",
            "max_steps": "7",
        },
    )
    assert config.learning_rate == 1e-5  # YAML reads 1e-5 as a string; it is coerced
    assert config.beta == 0.25 and config.bf16 is False and config.max_steps == 7
    assert config.reward_funcs == ["accuracy", "format"] and config.reward_weights == [1.0, 0.2]
    assert config.report_to == ["tensorboard"] and config.loss_type == "hinge"


@dataclass
class ChoiceConfig(TrainingConfig):
    padding_free: bool | Literal["auto"] = "auto"  # a switch with a third, named setting


def test_a_value_no_alternative_of_a_union_takes_names_them_all_and_suggests():
    assert build_config(ChoiceConfig, {"padding_free": "true"}, from_cli=True).padding_free is True
    assert build_config(ChoiceConfig, {"padding_free": "auto"}, from_cli=True).padding_free == "auto"
    with pytest.raises(ConfigError) as info:
        build_config(ChoiceConfig, {"padding_free": "atuo"}, from_cli=True)
    assert "padding_free: expected true or false, or one of 'auto', got 'atuo' (did you mean 'auto'?)" in str(
        info.value
    )


def test_unknown_key_suggests_and_all_problems_reported():
    with pytest.raises(ConfigError) as info:
        build_config(DemoConfig, {"learning_rat": 1, "bta": 2, "max_steps": "many", "loss_type": "sigmod"})
    text = str(info.value)
    assert "4 problems" in text
    assert "unknown key 'learning_rat'" in text and "did you mean 'learning_rate'" in text
    assert "did you mean 'beta'" in text
    assert "max_steps: expected an integer, got 'many'" in text
    assert "did you mean 'sigmoid'" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps must be >= 1"),
        ({"max_steps": 0}, "max_steps must be > 0"),
        ({"bf16": True, "fp16": True}, "choose one mixed-precision mode"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"bf16": "maybe"}, "expected true or false"),
        ({"save_total_limit": 0}, "save_total_limit"),
    ],
)
def test_invalid_values(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(DemoConfig, values)


def test_bool_int_float_coercion_is_strict():
    with pytest.raises(ConfigError, match="expected an integer"):
        build_config(DemoConfig, {"max_steps": True})
    assert build_config(DemoConfig, {"max_steps": 3.0}).max_steps == 3
    assert build_config(DemoConfig, {"beta": 1}).beta == 1.0


def test_missing_yaml_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(DemoConfig, scalar)


def test_save_and_reload_roundtrip(tmp_path):
    config = build_config(DemoConfig, {"beta": 0.3, "reward_funcs": ["a"], "report_to": ["tensorboard"]})
    save_config(config, tmp_path / "c.yaml", method="demo")
    again = load_config(DemoConfig, tmp_path / "c.yaml")
    assert again == config
    assert "method: demo" in (tmp_path / "c.yaml").read_text()


def test_describe_fields_uses_comments():
    fields = {name: help_text for name, _, _, help_text in describe_fields(DemoConfig)}
    assert fields["beta"] == "KL strength"
    assert "overrides num_train_epochs" in fields["max_steps"]
