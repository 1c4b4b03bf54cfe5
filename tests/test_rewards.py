"""posttrain.rewards: resolution by name, typed options from reward_kwargs, calling rules, validation, errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from posttrain import ConfigError, PluginError, TrainContext, hookimpl
from posttrain.config import TrainingConfig
from posttrain.rewards import RewardError, RewardSet, reward, reward_config_problems


def test_none_rewards_carry_no_weight():
    """w = (1, 2). Row 0: 1·1 + 2·3 = 7. Row 1: f2 returned None -> 1·2 = 2. Row 2: both None -> NaN."""
    per_func = torch.tensor([[1.0, 3.0], [2.0, float("nan")], [float("nan"), float("nan")]])
    out = RewardSet(["a", "b"], [None, None], [1.0, 2.0]).combine(per_func)
    assert out[:2].tolist() == [7.0, 2.0] and torch.isnan(out[2])


def test_reward_error_names_the_reward_the_row_the_step_and_the_line():
    def picky(prompts, completions, **columns):
        return [1 / 0 if c == "bad" else 1.0 for c in completions]

    with pytest.raises(RewardError) as info:
        RewardSet(["picky"], [picky]).score(["p0", "p0", "p1", "p1"], ["ok", "ok", "ok", "bad"], {}, None, [7, 9], 2, 3)
    text = str(info.value)
    assert "'picky'" in text and "completion 1 of dataset row 9" in text and "step 3" in text
    assert "ZeroDivisionError" in text and "test_rewards.py:" in text  # where in the function it failed


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, "high"], r"returned 'high' for completion 1 of dataset row 0"),
        ([1.0, float("nan")], "finite numbers"),
        ([float("inf"), 1.0], "finite numbers"),
    ],
)
def test_wrong_count_non_numbers_and_non_finite_values_are_errors(values, match):
    with pytest.raises(RewardError, match=match):
        RewardSet(["r"], [lambda prompts, completions: values]).score(["p", "p"], ["a", "b"], {}, None, [0], 2)


def test_columns_and_completion_ids_reach_the_functions_that_declare_them():
    seen = {}

    def strict(prompts, completions, answer):  # no **kwargs: gets no completion_ids
        seen["answer"] = answer
        return [0.0] * len(completions)

    def wants_ids(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(i)) for i in completion_ids]

    out = RewardSet(["strict", "ids"], [strict, wants_ids]).score(
        ["p", "p"], ["a", "b"], {"answer": ["1", "1"]}, [[4, 1], [5]], [0], 2
    )
    assert seen == {"answer": ["1", "1"], "ids": [[4, 1], [5]]} and out[:, 1].tolist() == [2.0, 1.0]


@dataclass
class PatternOptions:
    pattern: str = "a+"  # regex the completion must match
    bonus: float = 0.0  # added to every match


@reward(options=PatternOptions)
def matches(prompts, completions, *, options, **columns):
    import re

    return [float(re.fullmatch(options.pattern, c) is not None) + options.bonus for c in completions]


def test_typed_options_come_from_reward_kwargs_with_did_you_mean():
    rs = RewardSet.resolve(["m"], kwargs={"m": {"pattern": "b+", "bonus": "0.5"}}, given={"m": matches})
    assert rs.score(["p", "p"], ["bb", "aa"], group_size=2).flatten().tolist() == [1.5, 0.5]
    assert RewardSet.resolve(["m"], given={"m": matches}).score(["p"], ["aa"]).item() == 1.0  # defaults
    with pytest.raises(ConfigError, match="did you mean 'pattern'"):
        RewardSet.resolve(["m"], kwargs={"m": {"patern": "x"}}, given={"m": matches})
    with pytest.raises(ConfigError, match="bonus: expected a number"):
        RewardSet.resolve(["m"], kwargs={"m": {"bonus": "lots"}}, given={"m": matches})
    with pytest.raises(ConfigError, match="declares none"):
        RewardSet.resolve(["plain"], kwargs={"plain": {"x": 1}}, given={"plain": lambda prompts, completions: []})
    with pytest.raises(ConfigError, match="which reward_funcs does not list"):
        RewardSet.resolve(["m"], kwargs={"other": {}}, given={"m": matches})


@pytest.fixture
def pm():
    from posttrain import _registry

    manager = _registry.plugin_manager(load_entry_points=False)
    yield manager
    _registry.reset_plugin_manager()


class _Rewards:
    @hookimpl
    def posttrain_register_rewards(self, registry):
        registry.add("hooked", lambda prompts, completions, **c: [1.0] * len(completions))


def test_names_resolve_through_hooks_and_land_in_the_context(pm):
    pm.register(_Rewards(), name="test-rewards")
    ctx = TrainContext(config=TrainingConfig())
    rs = RewardSet.resolve(["hooked"], ctx=ctx, method="grpo")
    assert rs.names == ["hooked"] and list(ctx.rewards) == ["hooked"] and rs.weights.tolist() == [1.0]
    with pytest.raises(ConfigError, match="grpo needs at least one reward function"):
        RewardSet.resolve([], method="grpo")
    with pytest.raises(PluginError, match="nope"):
        RewardSet.resolve(["nope"])
    with pytest.raises(ConfigError, match=r"reward_weights has 2 values for 1 reward function \(hooked\)"):
        RewardSet.resolve(["hooked"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="reward_funcs names 'hooked' twice"):  # before resolving: no PluginError
        RewardSet.resolve(["hooked", "nope", "hooked"])


def test_reward_config_problems_name_the_field_and_the_fix():
    """One check for every online method's config and for RewardSet: the weights count, names listed twice."""
    assert reward_config_problems(["a", "b"], None) == [] and reward_config_problems(["a", "b"], [1.0, 0.5]) == []
    assert reward_config_problems([], [1.0, 2.0]) == []  # empty: the rewards given to posttrain.train, counted later
    (count,) = reward_config_problems(["a", "b"], [1.0])
    assert count == (
        "reward_weights has 1 value for 2 reward functions (a, b); give one weight per reward_funcs entry, in the "
        "same order, or leave reward_weights unset to weight each 1.0"
    )
    count, twice = reward_config_problems(["a", "b", "a", "c", "c", "c"], [1.0])
    assert count.startswith("reward_weights has 1 value for 6 reward functions")
    assert twice == (
        "reward_funcs names 'a' twice, 'c' 3 times (a, b, a, c, c, c); list each reward function once and give "
        "it a larger weight in reward_weights instead"
    )
    with pytest.raises(ConfigError, match=r"reward_weights has 1 value for 0 reward functions \(none\)"):
        RewardSet([], [], [1.0])  # the names are final here, so weights for none are counted


def test_metrics_use_trl_names():
    per_func = torch.tensor([[1.0, 0.0], [3.0, float("nan")]])
    rs = RewardSet(["a", "b"], [None, None])
    metrics = rs.metrics(per_func, rs.combine(per_func))
    assert metrics["rewards/a/mean"] == 2.0 and metrics["reward"] == 2.0 and "rewards/b/std" not in metrics
