"""Conformance checks for environment packages (ours or a third party's), and the tools to write them.

An environment package tests itself with a *policy*: a plain function that plays the model's part, from the
conversation so far (as text) to the model's next message. The checks run real episodes through core's
multi-turn sampler, with a :class:`ScriptedGenerator` in place of a model::

    from posttrain.testing.environments import environment_suite

    def solve(context: str) -> str:               # the model's turn, e.g. a correct tool call, then the answer
        ...

    TestCalculator = environment_suite("calculator", rows=ROWS, policy=solve)

Checks (each also a plain function raising ``AssertionError`` with what it compared):

- ``protocol``: the class follows :class:`posttrain.environments.Environment`; its tools have JSON schemas.
- ``metadata``: when given by name, the entry point is installed, usable, with a summary and a core range.
- ``terminates``: with ``policy``, every episode ends by the environment's ``done`` within ``max_turns``.
- ``robust``: with a policy that writes garbage and malformed tool calls, every step still returns a ``Step``.
- ``masks``: the loss mask covers exactly the policy's tokens, and prompt + episode is exactly the chat
  template's rendering of the conversation (observation tokens are the template's, never the model's).
- ``rewards_finite``: every turn reward, episode return and combined reward is a finite number.
- ``determinism``: the same seed plays the same episodes (tokens and rewards) twice.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

from posttrain.testing.tiny import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHECKS",
    "TOOL_CALL_TOKENS",
    "TOOL_CHAT_TEMPLATE",
    "ScriptedGenerator",
    "build_tool_tokenizer",
    "check_determinism",
    "check_masks",
    "check_metadata",
    "check_protocol",
    "check_rewards_finite",
    "check_robust",
    "check_terminates",
    "environment_suite",
    "garbage_policy",
    "play",
]

CHECKS = ("protocol", "metadata", "terminates", "robust", "masks", "rewards_finite", "determinism")
"""The checks of :func:`environment_suite`, in the order they run.

.. versionadded:: 1.0
"""

TOOL_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>tools: ' }}"
    "{% for tool in tools %}{{ tool.function.name }}({{ tool.function.parameters.properties | join(', ') }})"
    "{% if not loop.last %}; {% endif %}{% endfor %}{{ '<|end|>' }}{% endif %}" + CHAT_TEMPLATE
)
"""A chat template that shows tools compactly (``name(arg, ...)``) in a system turn, for tiny test models.

.. versionadded:: 1.0
"""

TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>", '{"name": "', '", "arguments": {"', '": "', '"}}', '": ']
"""Tokens a byte-pair tokenizer would have merged: the tags and the JSON glue of a tool call.

.. versionadded:: 1.0
"""


def build_tool_tokenizer():
    """The tiny character tokenizer with a tool role, tool-call tokens and :data:`TOOL_CHAT_TEMPLATE`.

    .. versionadded:: 1.0
    """
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|tool|>"], special_tokens=True)
    tokenizer.add_tokens(TOOL_CALL_TOKENS)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


class ScriptedGenerator:
    """A :class:`posttrain.generation.Generator` whose turns come from ``policy(context) -> str`` instead of a
    model: ``context`` is the prompt and the episode so far, decoded with special tokens. Each reply is
    tokenized and ended with the tokenizer's EOS, as a model's turn ends; it is cut (and marked truncated) at
    ``max_new_tokens``.

    .. versionadded:: 1.0
    """

    name = "scripted"
    reports_logps = False

    def __init__(self, tokenizer: Any, policy: Callable[[str], str], max_new_tokens: int = 10_000):
        self.tokenizer, self.policy, self.max_new_tokens = tokenizer, policy, max_new_tokens
        self.calls: list[list[str]] = []  # the replies of each generate call (one call per turn), in order

    def generate(self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None):
        from posttrain.generation import Completions

        token_ids, truncated = [], []
        self.calls.append([])
        for ids in prompt_ids:
            for _ in range(n):
                reply = self.policy(self.tokenizer.decode(ids))
                self.calls[-1].append(reply)
                out = [*self.tokenizer(reply, add_special_tokens=False).input_ids, self.tokenizer.eos_token_id]
                token_ids.append(out[: self.max_new_tokens])
                truncated.append(len(out) > self.max_new_tokens)
        return Completions(token_ids, truncated)

    def sync_weights(self, model: Any) -> None:
        pass

    def close(self) -> None:
        pass


def garbage_policy(seed: int = 0) -> Callable[[str], str]:
    """A policy that writes what a young model writes: noise, and tool calls broken in every usual way.

    .. versionadded:: 1.0
    """
    rng = random.Random(seed)
    shapes = [
        "",
        "hmm 12 + ?",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>',
        '<tool_call>{"name": 3}</tool_call>',
        '<tool_call>{"arguments": {"x": 1}}',
        "</tool_call> stray",
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call> and <tool_call>',
    ]
    return lambda context: rng.choice(shapes) + "".join(rng.choice("0123456789 +-*/()abc") for _ in range(4))


def play(
    environment: Any,
    rows: list[dict],
    policy: Callable[[str], str],
    *,
    environment_kwargs: dict | None = None,
    tokenizer: Any = None,
    num_generations: int = 2,
    max_turns: int = 8,
    seed: int = 0,
    step: int = 0,
    **config: Any,
) -> tuple[Any, Any]:
    """Play ``num_generations`` episodes per row through core's sampler with a scripted policy.

    Args:
        environment: an installed environment's name, or an environment class.
        rows: dataset rows (``prompt`` and the columns the environment reads).
        tokenizer: default :func:`build_tool_tokenizer`.
        config: further :class:`posttrain.generation.OnlineConfig` fields (``max_episode_tokens`` ...).

    Returns:
        A pair: one :class:`posttrain.generation.Rollout` for all rows, and the generator (its ``calls`` hold the
        policy's messages, one list per turn for the episodes still playing).

    .. versionadded:: 1.0
    """
    import datasets

    from posttrain._method import TrainContext
    from posttrain.generation import OnlineConfig, collate_prompts, prepare_prompts, sample
    from posttrain.generation._episodes import build_spec
    from posttrain.rewards import RewardSet

    tokenizer = tokenizer or build_tool_tokenizer()
    name = environment if isinstance(environment, str) else _name_of(environment)
    values = {"environment": name, "environment_kwargs": environment_kwargs, "max_turns": max_turns, "seed": seed}
    ctx = TrainContext(config=OnlineConfig(**values, **config), tokenizer=tokenizer, step=step)
    if not isinstance(environment, str):  # a class: no entry point to resolve, so hand core the checked spec
        spec = build_spec(name, environment, environment_kwargs, tokenizer)
        key = (name, repr(sorted((environment_kwargs or {}).items())))
        ctx.state["posttrain.generation"] = {"environment_key": key, "environment": spec, "synced_step": step}
    prompts = prepare_prompts(datasets.Dataset.from_list(copy.deepcopy(rows)), tokenizer, name)
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    generator = ScriptedGenerator(tokenizer, policy)
    rewards = RewardSet.resolve([], ctx=ctx, method="the environment kit")
    (rollout,) = sample(generator, None, [batch], ctx, num_generations, rewards)
    return rollout, generator


def _name_of(cls: type) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower()


# -- checks ----------------------------------------------------------------------------------------------------


def _resolve(environment: Any) -> type:
    if isinstance(environment, str):
        from posttrain import _registry as registry

        return registry.resolve_environment(environment)[0]
    return environment


def check_protocol(environment: Any) -> None:
    """The class follows the Environment protocol (signatures, no near-miss names) and its tools have JSON schemas.

    .. versionadded:: 1.0
    """
    from posttrain.environments import environment_problems

    problems = environment_problems(_resolve(environment))
    assert not problems, "; ".join(problems)


def check_metadata(name: str) -> None:
    """The installed entry point is usable and declares a summary and a core range.

    .. versionadded:: 1.0
    """
    from posttrain import _discovery as discovery

    entries = [e for e in discovery.discover(("environment",)) if e.name == name]
    assert entries, f"environment {name!r}: no 'posttrain.environments' entry point is installed under that name"
    e = entries[0]
    assert e.usable, f"environment {name!r} ({e.package}): status {e.status}: {e.reason}"
    assert e.summary, f"environment {name!r} ({e.package}): the distribution has no Summary (description)"
    assert ">=" in e.requires_core, f"environment {name!r} ({e.package}): declare a core range, e.g. posttrain>=1.0,<2"


def check_terminates(environment: Any, rows: list[dict], policy: Callable, **kwargs: Any) -> None:
    """Under ``policy`` every episode ends by the environment's ``done`` within ``max_turns``.

    .. versionadded:: 1.0
    """
    rollout, _ = play(environment, rows, policy, **kwargs)
    unfinished = [i for i, t in enumerate(rollout.is_truncated.tolist()) if t]
    assert not unfinished, (
        f"{len(unfinished)} of {len(rollout.is_truncated)} episodes did not end by the environment's done=True "
        f"within max_turns; the first: {rollout.completions[unfinished[0]]}"
    )


def check_robust(environment: Any, rows: list[dict], **kwargs: Any) -> None:
    """Garbage and malformed tool calls are answered with observations (never an exception), and counted.

    .. versionadded:: 1.0
    """
    rollout, _ = play(environment, rows, garbage_policy(), **kwargs)  # an EpisodeError fails the check
    if _spec_tools(environment, kwargs):
        malformed = rollout.metrics["tools/malformed_calls"]
        assert malformed > 0, "the garbage policy's malformed tool calls were not counted (tools/malformed_calls is 0)"


def check_masks(environment: Any, rows: list[dict], policy: Callable, **kwargs: Any) -> None:
    """The loss mask covers exactly the policy's tokens, turn by turn, and prompt + episode is exactly the chat
    template's rendering of the conversation (what the model read is what the template would show).

    .. versionadded:: 1.0
    """
    rollout, generator = play(environment, rows, policy, **kwargs)
    tokenizer = kwargs.get("tokenizer") or build_tool_tokenizer()
    turns_played = rollout.turn_index.max(dim=1).values + 1  # (N,) model turns of each episode
    for i in range(len(rollout.completions)):
        ids, mask = rollout.completion_ids[i], rollout.completion_mask[i].bool()
        real = rollout.completion_attention_mask[i].bool()
        assert not (mask & ~real).any(), f"episode {i}: the loss mask covers padding"
        turns = rollout.turn_index[i]
        for k in range(int(turns_played[i])):
            # the policy's reply to episode i at turn k: turn k's call served the episodes that reached it, in order
            expected = generator.calls[k][int((turns_played[:i] > k).sum())]
            said = tokenizer.decode(ids[turns == k], skip_special_tokens=True)
            assert said == tokenizer.decode(tokenizer(expected, add_special_tokens=False).input_ids), (
                f"episode {i}, turn {k}: the loss-masked tokens decode to {said!r}, the model wrote {expected!r}"
            )
        assert ((turns >= 0) == mask).all(), f"episode {i}: turn_index and the loss mask disagree"
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        seen = tokenizer.decode(prompt + ids[real].tolist())
        tools = _spec_tools(environment, kwargs)
        rendered = tokenizer.apply_chat_template(
            rollout.prompts[i] + rollout.completions[i], tools=tools or None, tokenize=False
        )
        assert rendered.startswith(seen) and not rendered[len(seen) :].strip(), (
            f"episode {i}: what the model read is not the chat template's rendering of the conversation:\n"
            f"  tokens:   {seen!r}\n  template: {rendered!r}"
        )


def _spec_tools(environment: Any, kwargs: dict) -> list:
    instance = _resolve(environment)(**(kwargs.get("environment_kwargs") or {}))
    return list(getattr(instance, "tools", None) or [])


def check_rewards_finite(environment: Any, rows: list[dict], policy: Callable, **kwargs: Any) -> None:
    """Turn rewards, episode returns and combined rewards are finite, under ``policy`` and under garbage.

    .. versionadded:: 1.0
    """
    for chosen in (policy, garbage_policy(1)):
        rollout, _ = play(environment, rows, chosen, **kwargs)
        returns = rollout.columns["episode_return"]
        assert all(math.isfinite(r) for r in returns), f"episode returns are not all finite: {returns}"
        assert bool(rollout.turn_rewards.isfinite().all()), f"turn rewards are not finite: {rollout.turn_rewards}"
        assert bool(rollout.rewards.isfinite().all()), f"combined rewards are not finite: {rollout.rewards}"


def check_determinism(environment: Any, rows: list[dict], policy: Callable, **kwargs: Any) -> None:
    """The same seed and policy play the same episodes (tokens and returns): randomness comes from ``seed``.

    .. versionadded:: 1.0
    """
    first, _ = play(environment, rows, policy, **kwargs)
    again, _ = play(environment, rows, policy, **kwargs)
    assert first.completion_ids.shape == again.completion_ids.shape and bool(
        (first.completion_ids == again.completion_ids).all()
    ), "the same seed and policy played different episodes (tokens differ): draw randomness from reset's seed"
    assert first.columns["episode_return"] == again.columns["episode_return"], (
        f"the same seed gave different returns: {first.columns['episode_return']} vs {again.columns['episode_return']}"
    )


def environment_suite(
    environment: Any,
    rows: list[dict],
    policy: Callable[[str], str],
    *,
    xfail: dict[str, str] | None = None,
    **kwargs: Any,
) -> type:
    """A pytest test class running every check in :data:`CHECKS` on ``environment`` (a name or a class).

    Args:
        rows: a few dataset rows the environment can start episodes from.
        policy: plays the model: from the conversation as text to the next message; it should finish episodes.
        xfail: check name -> reason, for a check that cannot hold (run as strict xfail).
        kwargs: passed to :func:`play` (``environment_kwargs``, ``tokenizer``, ``max_turns`` ...).

    .. versionadded:: 1.0
    """
    import pytest

    xfail = dict(xfail or {})
    unknown = sorted(set(xfail) - set(CHECKS))
    if unknown:
        raise ValueError(f"xfail names unknown checks {unknown}; the checks are {', '.join(CHECKS)}")

    def mark(name: str, test: Callable) -> Callable:
        if name in xfail:
            return pytest.mark.xfail(reason=xfail[name], strict=True)(test)
        return test

    def metadata(self):
        if not isinstance(environment, str):
            pytest.skip("given as a class: no entry point to check (pass the installed name to check metadata)")
        check_metadata(environment)

    tests = {
        "protocol": lambda self: check_protocol(environment),
        "metadata": metadata,
        "terminates": lambda self: check_terminates(environment, rows, policy, **kwargs),
        "robust": lambda self: check_robust(environment, rows, **kwargs),
        "masks": lambda self: check_masks(environment, rows, policy, **kwargs),
        "rewards_finite": lambda self: check_rewards_finite(environment, rows, policy, **kwargs),
        "determinism": lambda self: check_determinism(environment, rows, policy, **kwargs),
    }
    members = {f"test_{name}": mark(name, test) for name, test in tests.items()}
    return type("EnvironmentConformance", (), {"__doc__": f"Environment conformance: {environment!r}", **members})
