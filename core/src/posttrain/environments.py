"""Environments: multi-turn episodes and tools for agentic RL, published and installed as plugins.

An environment plays one *episode* per sampled completion: the model writes a turn, the environment answers
with an observation (a tool result, a game's feedback), and so on until the environment says the episode is
over, or the run's limits (``max_turns``, ``max_episode_tokens``) end it. A third party implements it in a
few lines, inheriting from nothing::

    import random
    from posttrain.environments import Step

    class GuessNumber:
        def __init__(self, high: int = 50):                  # environment_kwargs reach the constructor
            self.high = high

        def reset(self, row, seed):                          # one instance per episode, then reset once
            self.secret = random.Random(seed).randint(1, self.high)
            return None                                      # None: the row's prompt opens the episode

        def step(self, turn):                                # turn.text: the model's message
            guess = int(turn.content) if turn.content.isdigit() else None
            if guess == self.secret:
                return Step(reward=1.0, done=True)
            return Step(observation="higher" if guess is not None and guess < self.secret else "lower")

and publishes it under the entry-point group ``posttrain.environments``; the entry-point name is its public
name (``guess-number = "my_package:GuessNumber"``). ``posttrain list`` shows it, and any online method
trains against it by name: ``posttrain train grpo --environment guess-number --max_turns 6 ...``.

**Tools** are plain Python functions with type hints and a Google-style docstring. An environment lists them
in ``tools``; core hands them to the chat template (``apply_chat_template(..., tools=...)``, which builds each
JSON schema from the function), parses the calls the model writes with the environment's ``tool_parser``
(default :class:`ToolCallParser`: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), and the
environment runs them with :func:`run_tools`. A malformed call (bad JSON, an unknown tool, arguments that do
not fit the function) is never run: it is reported to the model as an error observation and counted
(``tools/malformed_calls``, ``tools/well_formed_fraction``).

**Rewards.** Each :class:`Step` may carry a reward for the turn; the episode return (their sum) joins the
run's reward functions as one more reward named after the environment (weight
``environment_reward_weight``). The per-turn rewards reach methods too, for per-turn credit assignment
(:attr:`posttrain.generation.Rollout.turn_rewards`, :func:`returns_to_go`).

.. versionadded:: 1.0
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from posttrain._errors import PosttrainError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Environment",
    "EpisodeError",
    "Observation",
    "Step",
    "ToolCall",
    "ToolCallParser",
    "Turn",
    "environment_problems",
    "episode_return",
    "returns_to_go",
    "run_tools",
]

Observation = str | list[dict] | None
"""What ``reset`` and ``step`` hand back to the model: a string (one user message), a list of chat messages
(``{"role": "tool", "content": ...}`` for tool results), or None (``reset``: the row's own prompt).

.. versionadded:: 1.0
"""


class EpisodeError(PosttrainError):
    """An environment raised, timed out or returned something unusable; names the environment, the dataset row,
    the sample, the turn and the step.

    .. versionadded:: 1.0
    """


@dataclass(frozen=True)
class ToolCall:
    """One well-formed tool call the model wrote.

    Attributes:
        name: the tool's name (one of the environment's ``tools``).
        arguments: keyword arguments, already checked against the function's signature.
        text: the call as written, tags included.

    .. versionadded:: 1.0
    """

    name: str
    arguments: dict[str, Any]
    text: str = ""


@dataclass
class Turn:
    """The model's turn, as an environment's ``step`` receives it.

    Attributes:
        text: the whole message, decoded without special tokens.
        content: ``text`` without the tool-call blocks, stripped: what the model said in prose.
        tool_calls: the well-formed calls, in order.
        malformed: one reason per malformed call (never run; :func:`run_tools` reports each to the model).
        index: the turn's number in the episode, from 0.
        tool_errors: filled by :func:`run_tools`: one entry per well-formed call whose tool raised.

    .. versionadded:: 1.0
    """

    text: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    index: int = 0
    tool_errors: list[str] = field(default_factory=list)


@dataclass
class Step:
    """What an environment's ``step`` returns.

    Attributes:
        observation: the environment's answer, appended to the conversation and masked out of the loss: a
            string (one user message) or chat messages (tool results). Required unless ``done``.
        reward: this turn's reward (a finite number), or None for none; the episode return is the sum.
        done: the episode is over (the model gets no further turn).
        metrics: numbers logged as ``environment/<name>``, averaged over the episodes that report them.

    .. versionadded:: 1.0
    """

    observation: Observation = None
    reward: float | None = None
    done: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode of a multi-turn task. Core makes one instance per episode (``cls(**environment_kwargs)``),
    calls ``reset`` once, then ``step`` after each model turn until a step is ``done`` or a limit is reached.

    Optional members (checked by :func:`environment_problems`):

    - ``tools``: a list of functions the model may call, shown to it through the chat template.
    - ``tool_parser``: a :class:`ToolCallParser` for another tag format (default ``<tool_call>``).
    - ``close()``: called once when the episode ends, to release what ``reset`` acquired.

    ``reset`` and ``step`` run under the run's ``environment_timeout``; an exception or a timeout stops the run
    with an :class:`EpisodeError` naming the row and the turn, so a broken environment never trains silently.

    .. versionadded:: 1.0
    """

    def reset(self, row: Mapping[str, Any], seed: int) -> Observation:
        """Start an episode for a dataset row (``prompt`` and every other column).

        ``seed`` depends only on the run's seed, the step, the row and the sample, so an environment that draws
        its randomness from it replays identically. Return the opening messages, or None for the row's prompt.
        """
        ...

    def step(self, turn: Turn) -> Step:
        """React to the model's turn: an observation for the next turn, a reward, and whether it is over."""
        ...


REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {"reset": ("row", "seed"), "step": ("turn",)}
OPTIONAL_MEMBERS = ("tools", "tool_parser", "close")


# -- tool calls -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallParser:
    """Finds the tool calls in a model turn. The format, as Hermes, Qwen 2.5/3 and many chat templates write it::

        <tool_call>{"name": "calculate", "arguments": {"expression": "37 * 48"}}</tool_call>

    Each block holds one JSON object with a string ``name`` and an object ``arguments``. A turn may hold several
    blocks; text outside them is the turn's prose (:attr:`Turn.content`). A block is *malformed* when it is not
    closed, is not such a JSON object, names no tool of the environment, or has arguments that do not fit the
    tool's signature and type hints; each is reported with a reason the model can read.

    Attributes:
        start, end: the tags around a call (change them for a template with another format).

    .. versionadded:: 1.0
    """

    start: str = "<tool_call>"
    end: str = "</tool_call>"

    def parse(self, text: str, tools: Sequence[Callable] = (), index: int = 0) -> Turn:
        """The :class:`Turn` for ``text``: prose, well-formed calls, and a reason per malformed call."""
        by_name = {t.__name__: t for t in tools}
        calls: list[ToolCall] = []
        malformed: list[str] = []
        prose: list[str] = []
        rest = text
        while True:
            at, stray = rest.find(self.start), rest.find(self.end)
            if stray != -1 and (at == -1 or stray < at):  # a closing tag with no opening one
                malformed.append(f"{self.end} without a matching {self.start}")
                prose.append(rest[:stray])
                rest = rest[stray + len(self.end) :]
                continue
            if at == -1:
                prose.append(rest)
                break
            prose.append(rest[:at])
            close = rest.find(self.end, at + len(self.start))
            if close == -1:
                malformed.append(f"{self.start} is never closed with {self.end}")
                break
            body = rest[at + len(self.start) : close]
            raw = rest[at : close + len(self.end)]
            rest = rest[close + len(self.end) :]
            call, problem = self._read(body.strip(), by_name)
            if problem:
                malformed.append(problem)
            else:
                calls.append(ToolCall(call[0], call[1], raw))
        return Turn(text=text, content="".join(prose).strip(), tool_calls=calls, malformed=malformed, index=index)

    def format(self, name: str, arguments: Mapping[str, Any]) -> str:
        """A well-formed call as text: for demonstrations (SFT rows) and tests."""
        return f"{self.start}{json.dumps({'name': name, 'arguments': dict(arguments)})}{self.end}"

    def _read(self, body: str, tools: dict[str, Callable]) -> tuple[tuple[str, dict] | None, str]:
        shape = f'write {self.start}{{"name": "<tool>", "arguments": {{...}}}}{self.end}'
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            return None, f"the tool call is not valid JSON ({exc.msg} at character {exc.pos}); {shape}"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None, f'the tool call has no string "name"; {shape}'
        name, arguments = call["name"], call.get("arguments", {})
        if not isinstance(arguments, dict):
            return None, f'the "arguments" of {name!r} must be a JSON object; {shape}'
        if name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            return None, f"there is no tool {name!r}; the tools are: {known}"
        problem = _argument_problem(tools[name], arguments)
        return ((name, arguments), "") if not problem else (None, f"{name}: {problem}")


_JSON_TYPES: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _argument_problem(tool: Callable, arguments: dict) -> str:
    """Why ``arguments`` do not fit ``tool`` (missing, unexpected, or of the wrong simple type), or ""."""
    try:
        inspect.signature(tool).bind(**arguments)
    except TypeError as exc:
        return str(exc)
    try:
        hints = typing.get_type_hints(tool)
    except Exception:  # unresolvable annotations: the signature check above is all we can do
        return ""
    for key, value in arguments.items():
        allowed = _JSON_TYPES.get(hints.get(key))
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            return f"argument {key!r} must be {hints[key].__name__}, got {type(value).__name__} {value!r}"
    return ""


def run_tools(turn: Turn, tools: Sequence[Callable]) -> list[dict]:
    """Run a turn's tool calls and answer each with a ``{"role": "tool", ...}`` message, in order.

    A tool's return value becomes the message content (``str()``); a tool that raises answers
    ``error: <Type>: <message>`` and is recorded in ``turn.tool_errors``; each malformed call answers
    ``error: <reason>`` so the model learns the format. Use it in ``step``::

        if turn.tool_calls or turn.malformed:
            return Step(observation=run_tools(turn, self.tools))

    .. versionadded:: 1.0
    """
    by_name = {t.__name__: t for t in tools}
    out = []
    for call in turn.tool_calls:
        try:
            content = str(by_name[call.name](**call.arguments))
        except Exception as exc:  # a tool's failure is the model's information, not the run's
            content = f"error: {type(exc).__name__}: {exc}"
            turn.tool_errors.append(f"{call.name}: {content}")
        out.append({"role": "tool", "name": call.name, "content": content})
    out += [{"role": "tool", "name": "error", "content": f"error: {reason}"} for reason in turn.malformed]
    return out


# -- checking an environment class -------------------------------------------------------------------------


def environment_problems(environment: Any) -> list[str]:
    """Everything wrong with an environment class against the protocol, as readable sentences.

    Checks ``reset(row, seed)`` and ``step(turn)``, that each tool is a function whose JSON schema the chat
    template can build (type hints and a documented argument each), and public names that are near misses of
    a protocol member (``setp``, ``tool``), which would silently never be used.

    .. versionadded:: 1.0
    """
    cls = environment if isinstance(environment, type) else type(environment)
    owner = f"{cls.__module__}.{cls.__qualname__}"
    problems = []
    for name, expected in REQUIRED_MEMBERS.items():
        member = inspect.getattr_static(cls, name, None)
        if member is None or not callable(member):
            problems.append(f"{owner} lacks {name}({', '.join(expected)}), required by the Environment protocol")
            continue
        try:
            params = [p for p in inspect.signature(member).parameters.values() if p.name != "self"]
        except (TypeError, ValueError):
            continue
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
        required = [p for p in positional if p.default is p.empty]
        if len(required) > len(expected) or (len(positional) < len(expected) and not varargs):
            problems.append(
                f"{owner}.{name}{inspect.signature(member)} does not match the protocol: core calls "
                f"{name}({', '.join(expected)})"
            )
    tools = getattr(environment, "tools", None) or ()
    if not isinstance(tools, (list, tuple)):
        problems.append(f"{owner}.tools must be a list of functions, got {type(tools).__name__}")
        tools = ()
    for tool in tools:
        problems += _tool_problems(owner, tool)
    parser = getattr(environment, "tool_parser", None)
    if parser is not None and not callable(getattr(parser, "parse", None)):
        problems.append(f"{owner}.tool_parser must have a parse(text, tools, index) method, like ToolCallParser")
    known = set(REQUIRED_MEMBERS) | set(OPTIONAL_MEMBERS)
    for attr in sorted(vars(cls)):
        if attr.startswith("_") or attr in known:
            continue
        # a close spelling, or the same letters swapped ("setp"), but not merely a similar word ("stop")
        close = [k for k in sorted(known) if sorted(k) == sorted(attr)]
        close = close or difflib.get_close_matches(attr, sorted(known), n=1, cutoff=0.8)
        if close:
            problems.append(
                f"{owner} defines {attr!r}, which is not part of the Environment protocol and is never used; "
                f"did you mean {close[0]!r}? (rename it, or make it private with a leading underscore)"
            )
    return problems


def _tool_problems(owner: str, tool: Any) -> list[str]:
    if not callable(tool) or not hasattr(tool, "__name__"):
        return [f"{owner}.tools holds {tool!r}, which is not a function"]
    try:
        from transformers.utils import get_json_schema

        get_json_schema(tool)
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return []
    except Exception as exc:
        return [
            f"tool {tool.__name__!r} of {owner} cannot be shown to the model: {exc}. Give every argument a type "
            "hint and a line under 'Args:' in the docstring (the chat template's JSON schema is built from them)"
        ]
    return []


# -- rewards --------------------------------------------------------------------------------------------------


def episode_return(prompts: list, completions: list, *, episode_return: list[float], **columns: Any) -> list[float]:
    """The reward function core adds for a run's environment: each episode's return (the sum of its steps'
    rewards, 0.0 when the environment gave none), read from the ``episode_return`` column of the rollout.

    .. versionadded:: 1.0
    """
    return [float(r) for r in episode_return]


def returns_to_go(turn_rewards: torch.Tensor, turn_index: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token returns for per-turn credit assignment: a model token of turn k gets Σ_{j≥k} γ^(j−k)·r_j.

    Args:
        turn_rewards: (N, T) float, the reward of each turn (0 where none, and past the episode's end).
        turn_index: (N, C) long, each completion token's turn, −1 for environment tokens and padding.
        gamma: discount per turn (1.0: undiscounted, so every turn of an episode sees what is still to come).

    Returns:
        (N, C) float32, 0 on environment tokens and padding.

    .. versionadded:: 1.0
    """
    import torch

    rewards = turn_rewards.float()
    togo = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for k in range(rewards.size(1) - 1, -1, -1):  # T is the number of turns: a handful
        running = rewards[:, k] + gamma * running
        togo[:, k] = running
    if togo.size(1) == 0:
        return torch.zeros(turn_index.shape, dtype=torch.float32, device=turn_index.device)
    gathered = togo.gather(1, turn_index.clamp(min=0).to(togo.device))
    return torch.where(turn_index >= 0, gathered, torch.zeros_like(gathered))


def _check_reward(value: Any) -> float | None:
    """``value`` as a finite float (None stays None); raises ValueError naming what is wrong."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__float__"):  # numbers, numpy scalars, 0-dim tensors
        raise ValueError(f"a reward must be a finite number or None, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"a reward must be a finite number or None, got {number}")
    return number
