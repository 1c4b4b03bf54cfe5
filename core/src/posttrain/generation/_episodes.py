"""Multi-turn episodes against an environment: what :func:`posttrain.generation.sample` does when the run's
config names an ``environment``. Read top to bottom::

    spec = environment_for(ctx)                       # resolve the name, check the class and environment_kwargs
    for each prompt x num_generations:                # one episode each, its own environment instance
        opening = env.reset(row, seed) or the row's prompt
        prompt_ids = chat template(opening, tools=env.tools, add_generation_prompt=True)
    for turn in range(max_turns):                     # every unfinished episode samples in one generate call
        ids = generator.generate(contexts)            # the model's turn: loss tokens (completion_mask 1)
        step = env.step(parser.parse(text, tools))    # under environment_timeout
        observation ids = the chat template's rendering of the observation after the model's end of turn
                                                      # environment tokens: attended to, never in the loss
    Rollout per micro-batch: completion = the whole episode after the prompt; rewards from the reward set,
    whose first reward is the episode return

The model's tokens are kept exactly as sampled (never re-tokenized from text), so the sequence the loss scores is
the sequence the policy produced, and an observation's tokens are exactly what the model read next.
"""

from __future__ import annotations

import inspect
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from posttrain._errors import ConfigError, PluginError
from posttrain.environments import EpisodeError, Step, ToolCallParser, Turn, _check_reward, environment_problems
from posttrain.generation import (
    Generator,
    Rollout,
    _forked_rng,
    _length_metrics,
    _score,
    _sync_once,
    generation_seed,
)

_MARK = "POSTTRAIN_TURN_PLACEHOLDER"  # stands for the model's turn when rendering an observation's tokens


@dataclass
class EnvironmentSpec:
    """A run's environment, resolved once: its class, options, tools and tool-call parser."""

    name: str
    cls: type
    kwargs: dict
    tools: list
    parser: Any
    package: str = ""


def environment_for(ctx: Any) -> EnvironmentSpec:
    """The environment ``ctx.config.environment`` names, checked once per run (cached in ``ctx.state``).

    Raises:
        PluginError: no package or hook provides it, or its class does not follow the protocol.
        ConfigError: ``environment_kwargs`` do not fit its constructor, or the tokenizer cannot render it.
    """
    config = ctx.config
    state = ctx.state.setdefault("posttrain.generation", {})
    key = (config.environment, repr(sorted((config.environment_kwargs or {}).items())))
    if state.get("environment_key") == key:
        return state["environment"]
    from posttrain._registry import resolve_environment

    cls, entry = resolve_environment(config.environment)
    source = f"environment {config.environment!r}" + (f" ({entry.package} {entry.version})" if entry else "")
    spec = build_spec(config.environment, cls, config.environment_kwargs, ctx.tokenizer, source)
    spec.package = entry.package if entry else ""
    state["environment_key"], state["environment"] = key, spec
    return spec


def build_spec(name: str, cls: type, kwargs: dict | None, tokenizer: Any, source: str = "") -> EnvironmentSpec:
    """Check an environment class, its options and the tokenizer's template against each other, once."""
    source = source or f"environment {name!r}"
    problems = environment_problems(cls)
    if problems:
        raise PluginError(
            f"{source} does not follow the Environment protocol: {'; '.join(problems)}. Fix the environment "
            "class (posttrain.environments.Environment documents the protocol), or upgrade its package."
        )
    kwargs = dict(kwargs or {})
    try:
        probe = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"environment_kwargs {kwargs} do not fit {source}: {cls.__name__}{inspect.signature(cls)} says "
            f"{exc}. Fix environment_kwargs (`posttrain info {name}` lists the options)."
        ) from None
    tools = list(getattr(probe, "tools", None) or [])
    parser = getattr(probe, "tool_parser", None) or ToolCallParser()
    _close(probe)
    spec = EnvironmentSpec(name, cls, kwargs, tools, parser)
    if tokenizer is not None:
        _check_template(tokenizer, spec, source)
    return spec


def _check_template(tokenizer: Any, spec: EnvironmentSpec, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{source} plays conversations, but the tokenizer has no chat template to render them; use a chat "
            "model, or set tokenizer.chat_template (in tokenizer_config.json)."
        )
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tools=spec.tools or None, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:
        raise ConfigError(
            f"the tokenizer's chat template cannot render the tools of {source}: {type(exc).__name__}: {exc}. "
            "Use a chat template that accepts `tools` (most tool-calling models ship one)."
        ) from None


@dataclass
class _Episode:
    """One episode in progress: its environment, the tokens so far and what the metrics need."""

    env: Any
    row: dict
    row_index: int
    sample: int
    prompt: list = field(default_factory=list)  # the opening messages
    prompt_ids: list = field(default_factory=list)
    completion: list = field(default_factory=list)  # model and environment tokens after the prompt
    model_mask: list = field(default_factory=list)  # 1 on the model's tokens
    turn_index: list = field(default_factory=list)  # the model token's turn, -1 on environment tokens
    logps: list = field(default_factory=list)  # the generator's log-probs (0.0 on environment tokens)
    transcript: list = field(default_factory=list)  # the messages after the prompt
    turn_rewards: list = field(default_factory=list)
    turns: int = 0
    done: bool = False
    truncated: bool = False
    calls: int = 0
    malformed: int = 0
    tool_errors: int = 0
    metrics: dict = field(default_factory=dict)


class _Episodes:
    """Plays the episodes of one ``sample`` call. Every call into environment code goes through :meth:`_call`."""

    def __init__(self, spec: EnvironmentSpec, ctx: Any):
        self.spec, self.ctx, self.config, self.tokenizer = spec, ctx, ctx.config, ctx.tokenizer
        self.mode = "train" if ctx.training else "eval"
        self.env_seconds = 0.0

    # -- calling environment code: timed out, errors naming the row and the turn -----------------------------

    def _where(self, ep: _Episode, turn: int | None) -> str:
        at = "at the start" if turn is None else f"at turn {turn}"
        return f"{at} of the episode for dataset row {ep.row_index} (sample {ep.sample}) at step {self.ctx.step + 1}"

    def _call(self, ep: _Episode, what: str, turn: int | None, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a daemon thread under ``environment_timeout``: a hung environment stops the run with
        an error instead of stalling it, and a thread left running never keeps the process alive."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = fn(*args)
            except BaseException as exc:
                result["error"] = exc

        started = time.perf_counter()
        thread = threading.Thread(target=target, name=f"posttrain-environment-{what}", daemon=True)
        thread.start()
        thread.join(self.config.environment_timeout)
        self.env_seconds += time.perf_counter() - started
        name = self.spec.name
        if thread.is_alive():
            raise EpisodeError(
                f"environment {name!r} did not return from {what}() within {self.config.environment_timeout:g} s "
                f"{self._where(ep, turn)}; a call that hangs would stall every episode of the run. Make {what}() "
                "faster (or give it its own timeout), or raise environment_timeout if it is slow by nature."
            )
        if "error" in result:
            exc = result["error"]
            frames = traceback.extract_tb(exc.__traceback__)
            at = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
            raise EpisodeError(
                f"environment {name!r} raised in {what}() {self._where(ep, turn)}: {type(exc).__name__}: {exc}{at}. "
                "An environment must answer anything the model writes with a Step (report the model's mistakes "
                "as observations); fix the environment."
            ) from exc
        return result.get("value")

    def _bad(self, ep: _Episode, what: str, turn: int | None, problem: str, fix: str) -> EpisodeError:
        return EpisodeError(f"environment {self.spec.name!r} {problem} from {what}() {self._where(ep, turn)}; {fix}")

    # -- starting, advancing and ending episodes ------------------------------------------------------------------

    def start(self, ep: _Episode) -> None:
        seed = generation_seed(self.config.seed, f"{self.mode}:environment:{ep.sample}", self.ctx.step, ep.row_index)
        ep.env = self._call(ep, "__init__", None, lambda: self.spec.cls(**self.spec.kwargs))
        opening = self._call(ep, "reset", None, ep.env.reset, dict(ep.row), seed)
        if opening is None:
            opening = ep.row["prompt"]
        ep.prompt = self._messages(ep, "reset", None, opening)
        text = self.tokenizer.apply_chat_template(
            ep.prompt, tools=self.spec.tools or None, tokenize=False, add_generation_prompt=True
        )
        ep.prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids

    def _messages(self, ep: _Episode, what: str, turn: int | None, value: Any) -> list[dict]:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return [dict(m) for m in value]
        raise self._bad(
            ep,
            what,
            turn,
            f"returned {type(value).__name__} {str(value)[:80]!r}",
            "return a string (one user message), a non-empty list of chat messages ({'role': ..., 'content': ...})"
            + (" or None (the row's prompt)." if what == "reset" else "."),
        )

    def advance(self, ep: _Episode, turn: int, ids: list[int], truncated: bool, logps: list[float] | None) -> None:
        """Append the model's turn, let the environment react, append its observation (or end the episode)."""
        budget = self.config.max_episode_tokens
        if budget is not None and len(ep.completion) + len(ids) > budget:
            ids, truncated = ids[: budget - len(ep.completion)], True
        ep.turns += 1
        ep.completion += ids
        ep.model_mask += [1] * len(ids)
        ep.turn_index += [turn] * len(ids)
        ep.logps += list(logps[: len(ids)]) if logps is not None else [0.0] * len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ep.transcript.append({"role": "assistant", "content": text})
        if truncated:  # no end of turn within the limits: the message is unfinished, the episode ends here
            ep.done = ep.truncated = True
            return
        # without tools there are no calls to find: "<tool_call>" is then just text the environment reads
        parsed = self.spec.parser.parse(text, self.spec.tools, turn) if self.spec.tools else Turn(text, text.strip())
        parsed.index = turn
        step = self._call(ep, "step", turn, ep.env.step, parsed)
        ep.calls += len(parsed.tool_calls)
        ep.malformed += len(parsed.malformed)
        ep.tool_errors += len(parsed.tool_errors)
        self._record(ep, turn, step)
        if step.done:
            ep.done = True
            return
        if turn + 1 >= self.config.max_turns:  # the model gets no further turn: the observation would be unread
            ep.done = ep.truncated = True
            return
        observation = self._messages(ep, "step", turn, step.observation)
        obs_ids = self._observation_ids(ep, observation, ids[-1])
        if budget is not None and len(ep.completion) + len(obs_ids) >= budget:  # no room left for a reply
            ep.done = ep.truncated = True
            return
        ep.completion += obs_ids
        ep.model_mask += [0] * len(obs_ids)
        ep.turn_index += [-1] * len(obs_ids)
        ep.logps += [0.0] * len(obs_ids)
        ep.transcript += observation

    def _record(self, ep: _Episode, turn: int, step: Any) -> None:
        if not isinstance(step, Step):
            raise self._bad(
                ep,
                "step",
                turn,
                f"returned {type(step).__name__} {str(step)[:80]!r}",
                "step must return posttrain.environments.Step(observation=..., reward=..., done=...).",
            )
        try:
            reward = _check_reward(step.reward)
            metrics = {k: _check_reward(v) for k, v in (step.metrics or {}).items()}
        except ValueError as exc:
            raise self._bad(ep, "step", turn, f"returned an unusable value ({exc})", "fix the environment.") from None
        ep.turn_rewards.append(0.0 if reward is None else reward)
        for k, v in metrics.items():
            if v is not None:
                ep.metrics.setdefault(k, []).append(v)
        if not step.done and step.observation is None:
            raise self._bad(
                ep,
                "step",
                turn,
                "returned a Step with no observation and done=False",
                "the model needs an observation to continue: return one, or done=True to end the episode.",
            )

    def _observation_ids(self, ep: _Episode, observation: list[dict], stop_id: int) -> list[int]:
        """The observation's tokens as the chat template renders them after the model's turn: whatever closes
        the model's turn beyond the stop token it sampled (``\\n`` after ``<|im_end|>``), the observation's
        messages, and the next generation prompt."""
        render = self.tokenizer.apply_chat_template
        tools = self.spec.tools or None
        conversation = [*ep.prompt, {"role": "assistant", "content": _MARK}]
        base = render(conversation, tools=tools, tokenize=False)
        full = render(conversation + observation, tools=tools, tokenize=False, add_generation_prompt=True)
        if not full.startswith(base) or _MARK not in base:
            raise ConfigError(
                f"the chat template renders the conversation differently once an observation of environment "
                f"{self.spec.name!r} follows the model's turn (it rewrites earlier turns), so the observation's "
                "tokens cannot be appended to what the model sampled. Use a chat template that appends messages."
            )
        tail = base[base.rindex(_MARK) + len(_MARK) :]
        stop_text = self.tokenizer.decode([stop_id])
        closing = tail[tail.index(stop_text) + len(stop_text) :] if stop_text and stop_text in tail else tail
        return self.tokenizer(closing + full[len(base) :], add_special_tokens=False).input_ids

    def finish(self, ep: _Episode) -> None:
        close = getattr(ep.env, "close", None)
        if callable(close):
            self._call(ep, "close", None, close)


def _close(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        close()


def sample_episodes(
    generator: Generator, model: Any, batches: list[dict], ctx: Any, num_generations: int, rewards: Any
) -> list[Rollout]:
    """:func:`posttrain.generation.sample` for a run with an environment: one episode per prompt x sample."""
    config = ctx.config
    spec = environment_for(ctx)
    _sync_once(generator, model, ctx)
    runner = _Episodes(spec, ctx)
    episodes: list[_Episode] = []
    for batch in batches:
        for i, row_index in enumerate(batch["row_index"]):
            row = {"prompt": _as_messages(batch["prompts"][i])}
            row.update({name: values[i] for name, values in batch.get("columns", {}).items()})
            episodes += [_Episode(None, row, int(row_index), g) for g in range(num_generations)]
    started = time.perf_counter()
    # evaluation samples under its own seed, so it never shifts the training run's random state
    scope = _forked_rng(generation_seed(config.seed, runner.mode, ctx.step, -1)) if not ctx.training else nullcontext()
    with scope:
        for ep in episodes:
            runner.start(ep)
        for turn in range(config.max_turns):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            seeds = None
            if config.per_prompt_generation:
                tag = f"{runner.mode}:turn:{turn}"
                seeds = [generation_seed(config.seed, f"{tag}:{ep.sample}", ctx.step, ep.row_index) for ep in active]
            done = generator.generate([ep.prompt_ids + ep.completion for ep in active], 1, seeds)
            for j, ep in enumerate(active):
                logps = done.logps[j] if done.logps is not None else None
                runner.advance(ep, turn, done.token_ids[j], done.truncated[j], logps)
        for ep in episodes:
            runner.finish(ep)
    seconds = time.perf_counter() - started
    out, start = [], 0
    for batch in batches:
        count = len(batch["row_index"]) * num_generations
        rollout = _assemble(episodes[start : start + count], batch, num_generations, ctx, generator.reports_logps)
        rollout.metrics["generation/seconds"] = (seconds - runner.env_seconds) / max(len(batches), 1)
        rollout.metrics["environment/seconds"] = runner.env_seconds / max(len(batches), 1)
        if rewards is not None:
            _score(rollout, rewards, num_generations, ctx.step + 1)
        out.append(rollout)
        start += count
    return out


def _as_messages(prompt: Any) -> list[dict]:
    """A conversational prompt as it is; a standard (string) prompt as one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _assemble(episodes: list[_Episode], batch: dict, n: int, ctx: Any, with_logps: bool) -> Rollout:
    import torch

    device, pad = batch["prompt_ids"].device, ctx.tokenizer.pad_token_id
    count = len(episodes)
    p_width = max(len(ep.prompt_ids) for ep in episodes)
    c_width = max(1, max(len(ep.completion) for ep in episodes))
    prompt_ids = torch.full((count, p_width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((count, p_width), dtype=torch.long)
    completion_ids = torch.full((count, c_width), pad, dtype=torch.long)
    completion_mask = torch.zeros((count, c_width), dtype=torch.long)
    attention = torch.zeros((count, c_width), dtype=torch.long)
    turn_index = torch.full((count, c_width), -1, dtype=torch.long)
    logps = torch.zeros((count, c_width)) if with_logps else None
    turn_rewards = torch.zeros((count, ctx.config.max_turns))
    for i, ep in enumerate(episodes):
        p, c = len(ep.prompt_ids), len(ep.completion)
        prompt_ids[i, p_width - p :] = torch.tensor(ep.prompt_ids, dtype=torch.long)
        prompt_mask[i, p_width - p :] = 1  # left-padded prompts, as collate_prompts lays them out
        completion_ids[i, :c] = torch.tensor(ep.completion, dtype=torch.long)
        completion_mask[i, :c] = torch.tensor(ep.model_mask, dtype=torch.long)  # the model's tokens only
        attention[i, :c] = 1  # the model reads every token, its own and the environment's
        turn_index[i, :c] = torch.tensor(ep.turn_index, dtype=torch.long)
        if logps is not None:
            logps[i, :c] = torch.tensor(ep.logps, dtype=torch.float32)
        turn_rewards[i, : len(ep.turn_rewards)] = torch.tensor(ep.turn_rewards, dtype=torch.float32)
    truncated = torch.tensor([ep.truncated for ep in episodes], dtype=torch.bool)
    columns = {name: [v for v in values for _ in range(n)] for name, values in batch.get("columns", {}).items()}
    columns["episode_return"] = [float(sum(ep.turn_rewards)) for ep in episodes]
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        is_truncated=truncated.to(device),
        sampling_logps=logps.to(device) if logps is not None else None,
        prompts=[ep.prompt for ep in episodes],
        completions=[ep.transcript for ep in episodes],
        columns=columns,
        row_index=[int(r) for r in batch["row_index"]],
        metrics={**_length_metrics(completion_mask.sum(1), truncated), **_episode_metrics(episodes)},
        completion_attention_mask=attention.to(device),
        turn_rewards=turn_rewards.to(device),
        turn_index=turn_index.to(device),
    )


def _episode_metrics(episodes: list[_Episode]) -> dict[str, float]:
    """Turns, episode length and return, tool-call counts per episode, and the environment's own metrics."""
    count = len(episodes)
    calls, malformed = sum(ep.calls for ep in episodes), sum(ep.malformed for ep in episodes)
    out = {
        "environment/turns": sum(ep.turns for ep in episodes) / count,
        "environment/episode_length": sum(len(ep.completion) for ep in episodes) / count,
        "environment/return": sum(sum(ep.turn_rewards) for ep in episodes) / count,
        "tools/calls": calls / count,
        "tools/malformed_calls": malformed / count,
        "tools/failed_calls": sum(ep.tool_errors for ep in episodes) / count,
    }
    if calls + malformed:
        out["tools/well_formed_fraction"] = calls / (calls + malformed)
    names = sorted({k for ep in episodes for k in ep.metrics})
    for name in names:
        values = [v for ep in episodes for v in ep.metrics.get(name, [])]
        out[f"environment/{name}"] = sum(values) / len(values)
    return out
