"""Environments: the tool-call parser, running tools, the protocol check, multi-turn episodes in the generation
service (masks, limits, rewards, errors, timeouts), the loss never seeing an environment token, discovery."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from posttrain import ConfigError, PluginError, TrainContext
from posttrain.environments import (
    EpisodeError,
    Step,
    ToolCallParser,
    environment_problems,
    returns_to_go,
    run_tools,
)
from posttrain.testing.environments import (
    ScriptedGenerator,
    build_tool_tokenizer,
    check_determinism,
    check_masks,
    check_rewards_finite,
    check_robust,
    check_terminates,
    play,
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def shout(text: str) -> str:
    """Upper-case a text; refuses an empty one.

    Args:
        text: what to shout.
    """
    if not text:
        raise ValueError("nothing to shout")
    return text.upper()


def undocumented(x: int) -> int:
    return x


# -- the tool-call parser ---------------------------------------------------------------------------------------


def test_parser_reads_calls_and_prose():
    text = 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> then'
    turn = ToolCallParser().parse(text, [add], index=2)
    assert turn.content == "Let me add.  then" and turn.index == 2 and turn.malformed == []
    (call,) = turn.tool_calls
    assert (call.name, call.arguments) == ("add", {"a": 2, "b": 3})
    assert call.text == '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def test_parser_reads_several_calls_in_order_and_formats_them():
    parser = ToolCallParser()
    text = parser.format("add", {"a": 1, "b": 2}) + parser.format("shout", {"text": "hi"})
    turn = parser.parse(text, [add, shout])
    assert [c.name for c in turn.tool_calls] == ["add", "shout"] and turn.content == ""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<tool_call>not json</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no string "name"'),
        ("<tool_call>[1, 2]</tool_call>", 'no string "name"'),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "must be a JSON object"),
        (
            '<tool_call>{"name": "mul", "arguments": {}}</tool_call>',
            "there is no tool 'mul'; the tools are: add, shout",
        ),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "missing a required argument: 'b'"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>', "unexpected keyword"),
        ('<tool_call>{"name": "add", "arguments": {"a": "1", "b": 2}}</tool_call>', "'a' must be int, got str"),
        ('<tool_call>{"name": "add", "arguments": {"a": true, "b": 2}}</tool_call>', "'a' must be int, got bool"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "never closed"),
        ("4 </tool_call>", "without a matching <tool_call>"),
    ],
)
def test_parser_reports_each_malformed_call_with_a_reason(text, reason):
    turn = ToolCallParser().parse(text, [add, shout])
    assert turn.tool_calls == [] and len(turn.malformed) == 1
    assert reason in turn.malformed[0]


def test_parser_keeps_well_formed_calls_next_to_malformed_ones():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><tool_call>oops</tool_call>'
    turn = ToolCallParser().parse(text, [add])
    assert [c.name for c in turn.tool_calls] == ["add"] and len(turn.malformed) == 1


def test_parser_with_other_tags():
    parser = ToolCallParser(start="[CALL]", end="[/CALL]")
    turn = parser.parse('x [CALL]{"name": "add", "arguments": {"a": 1, "b": 1}}[/CALL]', [add])
    assert turn.tool_calls[0].arguments == {"a": 1, "b": 1} and turn.content == "x"
    assert parser.format("add", {"a": 1}) == '[CALL]{"name": "add", "arguments": {"a": 1}}[/CALL]'


def test_float_parameters_accept_integers():
    def scale(x: float) -> float:
        """Scale.

        Args:
            x: a number.
        """
        return 2 * x

    assert ToolCallParser().parse('<tool_call>{"name": "scale", "arguments": {"x": 3}}</tool_call>', [scale]).tool_calls


def test_run_tools_answers_every_call_in_order():
    parser = ToolCallParser()
    text = parser.format("add", {"a": 2, "b": 3}) + parser.format("shout", {"text": ""}) + "<tool_call>bad</tool_call>"
    turn = parser.parse(text, [add, shout])
    messages = run_tools(turn, [add, shout])
    assert [m["content"] for m in messages[:2]] == ["5", "error: ValueError: nothing to shout"]
    assert messages[2]["content"].startswith("error: the tool call is not valid JSON")
    assert all(m["role"] == "tool" for m in messages)
    assert turn.tool_errors == ["shout: error: ValueError: nothing to shout"]


# -- the protocol check ---------------------------------------------------------------------------------------


class Echo:
    """Ends the episode at once; the reward is the length of what the model said."""

    def reset(self, row, seed):
        return None

    def step(self, turn):
        return Step(reward=float(len(turn.content)), done=True)


def test_environment_problems_accepts_a_conforming_class():
    class WithTools(Echo):
        tools = [add, shout]

    assert environment_problems(Echo) == [] and environment_problems(WithTools) == []


def test_environment_problems_names_each_mistake():
    class Bad:
        tools = [undocumented, "add"]

        def reset(self, row):
            return None

        def setp(self, turn):
            return Step(done=True)

    problems = " | ".join(environment_problems(Bad))
    assert "reset(self, row) does not match the protocol: core calls reset(row, seed)" in problems
    assert "lacks step(turn), required by the Environment protocol" in problems
    assert "defines 'setp'" in problems and "did you mean 'step'" in problems
    assert "tool 'undocumented'" in problems and "type hint" in problems
    assert "holds 'add', which is not a function" in problems


def test_returns_to_go_by_hand():
    """Turn rewards (1, 2, 4) with gamma 0.5: turn 0 sees 1 + 0.5*2 + 0.25*4 = 3, turn 1 sees 2 + 0.5*4 = 4,
    turn 2 sees 4; environment tokens (-1) and padding get 0."""
    rewards = torch.tensor([[1.0, 2.0, 4.0], [5.0, 0.0, 0.0]])
    index = torch.tensor([[0, 0, -1, 1, -1, 2], [0, 0, -1, -1, -1, -1]])
    expected = torch.tensor([[3.0, 3.0, 0.0, 4.0, 0.0, 4.0], [5.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(returns_to_go(rewards, index, gamma=0.5), expected)
    assert returns_to_go(rewards, index)[0].tolist() == [7.0, 7.0, 0.0, 6.0, 0.0, 4.0]


# -- episodes through the generation service -------------------------------------------------------------------

ROWS = [
    {"prompt": [{"role": "user", "content": "2+3"}], "a": 2, "b": 3},
    {"prompt": [{"role": "user", "content": "7+8"}], "a": 7, "b": 8},
]


class Adder:
    """Calls come back as tool results; an answer without a call ends the episode: 1.0 when it is the sum."""

    tools = [add]

    def reset(self, row, seed):
        self.expected = row["a"] + row["b"]
        return None

    def step(self, turn):
        if turn.tool_calls or turn.malformed:
            return Step(observation=run_tools(turn, self.tools), reward=0.1 * len(turn.tool_calls))
        return Step(reward=float(turn.content == str(self.expected)), done=True, metrics={"answered": 1.0})


def solve_adder(context: str) -> str:
    result = re.search(r"<\|tool\|>([^<]*)<\|end\|>\s*<\|assistant\|>$", context)
    if result:
        return result.group(1)
    a, b = re.findall(r"(\d+)\+(\d+)", context)[-1]
    return ToolCallParser().format("add", {"a": int(a), "b": int(b)})


def test_episode_tokens_masks_rewards_and_metrics():
    rollout, _ = play(Adder, ROWS, solve_adder, num_generations=2)
    tokenizer = build_tool_tokenizer()
    first = rollout.completion_ids[0][rollout.completion_attention_mask[0].bool()]
    call = ToolCallParser().format("add", {"a": 2, "b": 3})
    assert tokenizer.decode(first) == f"{call}<|end|><|tool|>5<|end|><|assistant|>5<|end|>"
    model_tokens = first[rollout.completion_mask[0][: len(first)].bool()]
    assert tokenizer.decode(model_tokens) == f"{call}<|end|>5<|end|>"  # the loss sees the model's tokens only
    env_tokens = first[~rollout.completion_mask[0][: len(first)].bool()]
    assert tokenizer.decode(env_tokens) == "<|tool|>5<|end|><|assistant|>"  # the template's, masked out
    assert rollout.completions[0] == [
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]
    assert rollout.turn_rewards[:, :2].tolist() == [[0.1, 1.0]] * 4 or torch.allclose(
        rollout.turn_rewards[:, :2], torch.tensor([[0.1, 1.0]] * 4)
    )
    assert rollout.columns["episode_return"] == pytest.approx([1.1] * 4)
    assert rollout.rewards.tolist() == pytest.approx([1.1] * 4) and not rollout.is_truncated.any()
    metrics = rollout.metrics
    assert metrics["environment/turns"] == 2 and metrics["tools/calls"] == 1 and metrics["tools/malformed_calls"] == 0
    assert metrics["tools/well_formed_fraction"] == 1.0 and metrics["environment/answered"] == 1.0
    assert metrics["rewards/adder/mean"] == pytest.approx(1.1)
    assert torch.equal(rollout.attention_mask[:, -rollout.completion_mask.size(1) :], rollout.completion_attention_mask)


def test_kit_checks_pass_for_a_good_environment():
    check_masks(Adder, ROWS, solve_adder)
    check_terminates(Adder, ROWS, solve_adder)
    check_rewards_finite(Adder, ROWS, solve_adder)
    check_determinism(Adder, ROWS, solve_adder)
    check_robust(Adder, ROWS)


CHATML = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_observation_tokens_close_the_model_turn_as_the_template_does():
    """A ChatML-like template writes '\\n' after the end-of-turn token the model samples: that newline is the
    environment's (masked), and what the model reads is exactly the template's rendering."""
    tokenizer = build_tool_tokenizer()
    tokenizer.chat_template = CHATML
    rollout, _ = play(Adder, ROWS[:1], solve_adder, num_generations=1, tokenizer=tokenizer)
    ids = rollout.completion_ids[0]
    env = ids[~rollout.completion_mask[0].bool() & rollout.completion_attention_mask[0].bool()]
    assert tokenizer.decode(env) == "\n<|tool|>5<|end|>\n<|assistant|>"
    check_masks(Adder, ROWS, solve_adder, tokenizer=tokenizer)


def test_a_standard_prompt_is_one_user_message():
    rows = [{"prompt": "7+8", "a": 7, "b": 8}]
    rollout, _ = play(Adder, rows, solve_adder, num_generations=1)
    assert rollout.prompts[0] == [{"role": "user", "content": "7+8"}] and rollout.columns["episode_return"] == [1.1]


def test_malformed_calls_are_answered_counted_and_never_run():
    def policy(context):
        return "<tool_call>{oops}</tool_call>" if context.count("<|assistant|>") == 1 else "5"

    rollout, _ = play(Adder, ROWS[:1], policy, num_generations=1)
    assert rollout.completions[0][1]["content"].startswith("error: the tool call is not valid JSON")
    assert rollout.metrics["tools/malformed_calls"] == 1 and rollout.metrics["tools/calls"] == 0
    assert rollout.metrics["tools/well_formed_fraction"] == 0.0


def test_max_turns_ends_the_episode_without_an_unread_observation():
    rollout, generator = play(Adder, ROWS[:1], lambda c: "thinking", num_generations=1, max_turns=1)
    assert rollout.is_truncated.tolist() == [False] and len(generator.calls) == 1  # "thinking" is an answer

    rollout, generator = play(Adder, ROWS[:1], lambda c: "<tool_call>x</tool_call>", num_generations=1, max_turns=3)
    assert rollout.is_truncated.tolist() == [True] and len(generator.calls) == 3
    assert rollout.completions[0][-1]["role"] == "assistant"  # the last observation was never appended
    assert rollout.metrics["environment/turns"] == 3


def test_max_episode_tokens_cuts_the_episode():
    """The call is 18 tokens and its end of turn one more: a budget of 10 cuts the call (no step, no reward); a
    budget of 20 fits the call but not the observation after it (the step's reward counts)."""
    rollout, _ = play(Adder, ROWS[:1], solve_adder, num_generations=1, max_episode_tokens=10)
    assert rollout.is_truncated.tolist() == [True] and rollout.columns["episode_return"] == [0.0]
    assert int(rollout.completion_attention_mask.sum()) == 10 and int(rollout.completion_mask.sum()) == 10
    rollout, _ = play(Adder, ROWS[:1], solve_adder, num_generations=1, max_episode_tokens=20)
    assert rollout.is_truncated.tolist() == [True] and rollout.columns["episode_return"] == pytest.approx([0.1])
    assert int(rollout.completion_attention_mask.sum()) == int(rollout.completion_mask.sum()) == 19


def test_an_environment_without_tools_sees_tags_as_text():
    rollout, _ = play(Echo, ROWS[:1], lambda c: "<tool_call>x</tool_call>", num_generations=1)
    assert rollout.columns["episode_return"] == [24.0]  # step saw the whole text as content
    assert rollout.metrics["tools/malformed_calls"] == 0 and "tools/well_formed_fraction" not in rollout.metrics


def test_reset_may_open_the_episode_with_its_own_messages():
    class Opening(Echo):
        def reset(self, row, seed):
            return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"seed {seed % 7}"}]

    rollout, _ = play(Opening, ROWS[:1], lambda c: "ok", num_generations=1)
    assert rollout.prompts[0][0] == {"role": "system", "content": "be brief"}
    assert "<|system|>be brief<|end|><|user|>seed " in build_tool_tokenizer().decode(rollout.prompt_ids[0])


def test_seeds_make_episodes_reproducible_and_samples_differ():
    class Secret(Echo):
        def reset(self, row, seed):
            self.secret = seed % 1000
            return None

        def step(self, turn):
            return Step(reward=float(self.secret), done=True)

    first, _ = play(Secret, ROWS, lambda c: "x", num_generations=3)
    again, _ = play(Secret, ROWS, lambda c: "x", num_generations=3)
    other, _ = play(Secret, ROWS, lambda c: "x", num_generations=3, seed=1)
    later, _ = play(Secret, ROWS, lambda c: "x", num_generations=3, step=5)
    returns = first.columns["episode_return"]
    assert returns == again.columns["episode_return"] and len(set(returns)) == 6
    assert returns != other.columns["episode_return"] and returns != later.columns["episode_return"]


# -- failures: reported with the row and the turn, never a hang ------------------------------------------------


def failing(step_impl):
    return type("Failing", (Echo,), {"step": step_impl})


@pytest.mark.parametrize(
    ("step_impl", "message"),
    [
        (lambda self, turn: 1 / 0, r"raised in step\(\) at turn 0 .* row 0 \(sample 0\) at step 1: ZeroDivisionError"),
        (lambda self, turn: {"done": True}, r"returned dict .* from step\(\) at turn 0 .*; step must return .*Step"),
        (lambda self, turn: Step(reward=float("nan"), done=True), r"unusable value \(a reward must be a finite"),
        (lambda self, turn: Step(reward="1", done=True), r"unusable value \(a reward must be a finite number or None"),
        (lambda self, turn: Step(), r"a Step with no observation and done=False .*return one, or done=True"),
        (lambda self, turn: Step(observation=42), r"returned int '42' from step\(\) at turn 0"),
    ],
)
def test_environment_failures_name_the_environment_row_and_turn(step_impl, message):
    with pytest.raises(EpisodeError, match=message) as info:
        play(failing(step_impl), ROWS, lambda c: "x", num_generations=1)
    assert "environment 'failing'" in str(info.value)


def test_a_failing_reset_is_reported_at_the_start():
    class BadReset(Echo):
        def reset(self, row, seed):
            raise KeyError("secret")

    with pytest.raises(EpisodeError, match=r"raised in reset\(\) at the start of the episode for dataset row 0"):
        play(BadReset, ROWS, lambda c: "x", num_generations=1)


def test_a_hanging_step_times_out_instead_of_stalling_the_run():
    class Hangs(Echo):
        def step(self, turn):
            time.sleep(30)

    started = time.perf_counter()
    with pytest.raises(EpisodeError, match=r"did not return from step\(\) within 0.2 s at turn 0 .*row 0"):
        play(Hangs, ROWS, lambda c: "x", num_generations=1, environment_timeout=0.2)
    assert time.perf_counter() - started < 5


# -- configuration and resolution ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"max_turns": 0}, "max_turns must be >= 1"),
        ({"environment_kwargs": {"x": 1}}, "environment_kwargs is set but environment is not"),
        ({"environment": "Bad Name"}, "environment must be an environment name"),
        ({"environment": "x", "max_episode_tokens": 0}, "max_episode_tokens must be >= 1"),
        ({"environment": "x", "environment_timeout": 0}, "environment_timeout must be > 0"),
    ],
)
def test_config_problems(values, problem):
    from posttrain.config import build_config
    from posttrain.generation import OnlineConfig

    with pytest.raises(ConfigError, match=problem):
        build_config(OnlineConfig, values)


@pytest.fixture
def registered():
    """Environments registered through the hook, on a fresh plugin manager."""
    from posttrain import _registry as registry
    from posttrain import hookimpl

    class Hooks:
        @hookimpl
        def posttrain_register_environments(self, registry):
            registry.add("adder", Adder)
            registry.add("keyword-env", KeywordEnv)

    registry.reset_plugin_manager()
    registry.plugin_manager(load_entry_points=False).register(Hooks())
    yield
    registry.reset_plugin_manager()


class KeywordEnv(Echo):
    def __init__(self, level: int = 1):
        self.level = level


def context(**values):
    from posttrain.generation import OnlineConfig

    return TrainContext(config=OnlineConfig(**values), tokenizer=build_tool_tokenizer())


def test_build_generator_checks_the_environment_before_training(registered, tiny_model_dir):
    from posttrain.generation import build_generator

    with pytest.raises(
        ConfigError, match=r"environment_kwargs \{'levle': 2\} do not fit .*KeywordEnv\(level: .?int.? = 1\)"
    ):
        build_generator(context(environment="keyword-env", environment_kwargs={"levle": 2}))
    with pytest.raises(PluginError, match="unknown environment 'nope'"):
        build_generator(context(environment="nope"))


def test_rewards_gain_the_episode_return_named_after_the_environment(registered):
    from posttrain.rewards import RewardSet

    only = RewardSet.resolve([], ctx=context(environment="adder"))
    assert only.names == ["adder"] and only.weights.tolist() == [1.0]
    both = RewardSet.resolve(
        ["len"],
        [0.5],
        ctx=context(environment="adder", environment_reward_weight=2.0),
        given={"len": lambda prompts, completions, **c: [len(x) for x in completions]},
    )
    assert both.names == ["adder", "len"] and both.weights.tolist() == [2.0, 0.5]
    with pytest.raises(ConfigError, match="also the name of the run's environment"):
        RewardSet.resolve(["adder"], ctx=context(environment="adder"), given={"adder": lambda **kw: []})


def test_hook_registered_environment_trains_by_name(registered):
    rollout, _ = play("adder", ROWS, solve_adder, num_generations=2)
    assert rollout.columns["episode_return"] == pytest.approx([1.1] * 4)


# -- the loss never sees an environment token -----------------------------------------------------------------


def test_loss_and_gradients_ignore_environment_token_predictions(tmp_path):
    """Scale and shift the final hidden state at every position that predicts an environment token (or padding): a
    loss over ``completion_mask`` and its gradients must not move; the same edit on one model-token position must."""
    from posttrain.ops import completion_logps
    from posttrain.testing import build_tiny_model
    from transformers import AutoModelForCausalLM

    tokenizer = build_tool_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", tokenizer=tokenizer))
    rollout, _ = play(Adder, ROWS, solve_adder, num_generations=2, tokenizer=tokenizer)
    mask, width = rollout.completion_mask, rollout.completion_mask.size(1)
    assert (~mask.bool() & rollout.completion_attention_mask.bool()).any()  # there are environment tokens

    def loss_and_grads(edit: torch.Tensor | None):
        handle = None
        if edit is not None:
            # the final hidden states feed the head position by position (the head runs in chunks, so no logits
            # tensor exists to edit): position T - C - 1 + j predicts completion token j
            def hook(module, args, hidden):
                change = torch.zeros_like(hidden, dtype=torch.bool)
                start = hidden.size(1) - width - 1
                change[:, start : start + width] = edit.unsqueeze(-1)
                return torch.where(change, hidden * 3.0 + 7.0, hidden)

            handle = model.get_decoder().norm.register_forward_hook(hook)
        model.zero_grad()
        logps, _ = completion_logps(model, rollout.input_ids, rollout.attention_mask, width)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        if handle:
            handle.remove()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    base_loss, base_grads = loss_and_grads(None)
    env_loss, env_grads = loss_and_grads(~mask.bool())
    assert torch.equal(base_loss, env_loss)
    assert all(torch.equal(a, b) for a, b in zip(base_grads, env_grads))
    one_model_token = torch.zeros_like(mask, dtype=torch.bool)
    one_model_token[0, 0] = True
    moved_loss, _ = loss_and_grads(one_model_token)
    assert not torch.equal(base_loss, moved_loss)  # the check can fail: model-token logits do reach the loss


# -- discovery and the CLI -------------------------------------------------------------------------------------

ENV_MODULE = '''
from posttrain.environments import Step


def add(a: int, b: int) -> int:
    """Add.

    Args:
        a: first.
        b: second.
    """
    return a + b


class Maze:
    """Walk out of a maze."""

    tools = [add]

    def __init__(self, size: int = 4):
        self.size = size

    def reset(self, row, seed):
        return None

    def step(self, turn):
        return Step(done=True)
'''


def test_list_shows_environments_with_status(fake_site, capsys):
    from posttrain.cli import main

    fake_site.add(
        "pt-maze",
        status="4 - Beta",
        environments={"maze": "pt_maze:Maze"},
        summary="A maze.",
        module="pt_maze",
        code=ENV_MODULE,
    )
    fake_site.add("pt-broken-env", environments={"lost": "pt_nowhere:Env"})
    assert main(["list", "--kind", "environment"]) == 0
    out = capsys.readouterr().out
    assert "Environments:" in out and "Methods:" not in out
    assert re.search(r"maze\s+pt-maze\s+1\.0\.0\s+experimental\s+yes\s+A maze\.", out)
    assert re.search(r"lost\s+pt-broken-env\s+1\.0\.0\s+broken", out)
    assert main(["list", "--json", "--kind", "environment"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["maze"]["kind"] == "environment" and entries["maze"]["status"] == "experimental"
    assert "pt_maze" not in __import__("sys").modules  # listing never imports plugin code


def test_info_describes_an_environment(fake_site, capsys):
    from posttrain.cli import main

    fake_site.add("pt-maze", environments={"maze": "pt_maze:Maze"}, module="pt_maze", code=ENV_MODULE)
    assert main(["info", "maze", "--no-import"]) == 0
    out = capsys.readouterr().out
    assert "environment: maze" in out and "package:  pt-maze 1.0.0" in out and "status:   stable" in out
    assert "not shown (--no-import" in out and "pt_maze" not in __import__("sys").modules
    assert main(["info", "maze"]) == 0
    out = capsys.readouterr().out
    assert "Walk out of a maze." in out and "size: int = 4" in out and "add(a: int, b: int) -> int: Add." in out
    assert main(["info", "maze", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["entry"]["kind"] == "environment" and facts["entry"]["package"] == "pt-maze"
    assert facts["environment"]["options"] == [{"name": "size", "type": "int", "default": "4"}]
    assert [t["name"] for t in facts["environment"]["tools"]] == ["add"]


def test_two_packages_with_one_environment_name_conflict(fake_site):
    from posttrain import _discovery as discovery

    fake_site.add("pt-maze-a", environments={"maze": "pt_maze:Maze"}, module="pt_maze", code=ENV_MODULE)
    fake_site.add("pt-maze-b", environments={"maze": "pt_maze:Maze"})
    (a, b) = [e for e in discovery.discover(("environment",)) if e.name == "maze"]
    assert a.status == b.status == "conflict" and "pt-maze-a and pt-maze-b" in a.reason
    with pytest.raises(PluginError, match="environment 'maze' is provided by pt-maze-a and pt-maze-b"):
        discovery.find("environment", "maze")


def test_scripted_generator_marks_cut_replies_truncated():
    tokenizer = build_tool_tokenizer()
    done = ScriptedGenerator(tokenizer, lambda c: "abcdef", max_new_tokens=3).generate([[5, 6]], 2)
    assert done.truncated == [True, True] and [len(t) for t in done.token_ids] == [3, 3]
    assert not math.isnan(len(done.token_ids))
