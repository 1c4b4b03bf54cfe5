"""Asynchronous generation: the next steps' batches are sampled and scored while the trainer trains.

In synchronous RL the trainer waits while the policy samples, and sampling waits while the trainer updates.
With ``async_generation: true`` they overlap. One bookkeeping (:class:`AsyncGenerator`: which job needs which
weights, what is pending, ready, checkpointed, the checks and metrics) drives one of two producers::

    training process                                    producer
    ────────────────                                    ────────
    on_step(v): once the producer released v - 1,       job s needs weights max(first, s - K):
                push the weights of version v           hf: a worker process copies them in from shared memory
                submit the jobs of steps <= v + K  ───▶ vllm-server: a thread asks the server (which holds them)
    sample() in step s: take batch s  ◀──────────────── sample, score; result queue (at most K + 1 ahead)
    loss, backward, optimizer step

``K`` is ``max_staleness`` and ``first`` the step the run started or resumed at. Design decisions:

1. **Fixed lag.** The batch of step s is sampled from the weights after exactly max(first, s - K) optimizer
   steps, never newer ones even when they exist, so a run is reproducible, resume is exact, and ``K = 0`` is
   the synchronous algorithm. The trainer does not overwrite version v - 1 before the producer releases it
   (``_Producer.released``): the worker process once it has *started* every job that needs it (it copied
   the weights), the server once every such job has *finished* sampling (its weights are the sampling
   weights, one version at a time). When generation is the bottleneck the producer never waits for weights,
   so the fixed lag costs no throughput.
2. **hf: weights travel through shared memory**: one CPU copy of the policy's tensors, allocated once and
   handed to the worker at start, plus a version counter under a lock. A push is one copy on each side; it
   needs no rendezvous, port or collective (torch.distributed with gloo would make both processes meet at
   every push, and would collide with the training process group under accelerate).
   **vllm-server: the server is the worker**: it is already a process of its own, so a thread of the
   training process sends it the jobs (``_vllm_server.ServerSampler``) and the weights go through vLLM's
   weight-transfer API as in synchronous training. The in-process ``vllm`` engine is refused: it shares the
   training process and its GPU.
3. **The loop says what comes next** (``ctx.upcoming_batches``): its data order is a pure function of (seed,
   step), so nothing here copies its sampler; every batch is checked against the step's real rows.
4. **Rewards are scored by the producer.** The worker process gets them pickled: module-level functions,
   partials and instances of importable classes travel; lambdas and closures are refused before it starts.
   The sampling thread calls them as they are.
5. **Process hygiene.** The worker starts with forkserver (spawn where there is none), never fork: the
   trainer may hold CUDA state or OpenMP threads. It ignores SIGINT and SIGTERM, because the trainer finishes
   its step and checkpoints first (and needs the worker for that), then stops it; it exits by itself when
   the training process is gone. A failure (the server's included) is sent back with its traceback; a death
   or a stall is noticed by the trainer within ``async_generation_timeout`` and never hangs it.
6. **Checkpoints** at step c save every batch sampled from weights older than c (they cannot be sampled
   again after a resume), after waiting for them; everything newer is sampled again, identically.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from posttrain._errors import ConfigError, PluginError, PosttrainError

if TYPE_CHECKING:  # pragma: no cover
    from posttrain._method import TrainContext, UpcomingBatch
    from posttrain.generation import Completions, Rollout, SamplingParams
    from posttrain.rewards import RewardSet

__all__ = ["AsyncGenerator", "GenerationWorkerError", "take_rollouts"]

STATE_FORMAT = 1  # of the checkpointed state; bump when its layout changes
PHASES = (
    "starting",
    "waiting for a job",
    "waiting for weights",
    "loading weights",
    "generating",
    "scoring",
    "sending",
)
_POLL_SECONDS = 0.02  # how often a waiting trainer checks the worker's liveness and progress
_STOP_GRACE_SECONDS = 2.0  # a stopping worker may finish its current call this long before it is killed
_STARTUP_SECONDS = 300.0  # the worker's start-up (imports, model) may take this long even with a shorter timeout


class GenerationWorkerError(PosttrainError):
    """The asynchronous generation worker failed, died or stopped making progress. The message names the
    worker, what it was doing (phase and step) and carries its traceback.

    .. versionadded:: 1.0
    """


def take_rollouts(
    generator: Any, batches: list[dict], ctx: TrainContext, num_generations: int, rewards: RewardSet | None
) -> list[Rollout]:
    """What :func:`posttrain.generation.sample` returns while training with ``async_generation``: the batch the
    worker sampled ahead for this step."""
    if not isinstance(generator, AsyncGenerator):
        raise ConfigError(
            f"async_generation is on, but the method samples with a {type(generator).__name__} that was not built by "
            "posttrain.generation.build_generator(ctx, ...); build the generator with build_generator, or set "
            "async_generation false"
        )
    return generator.take(batches, ctx, num_generations, rewards)


class _Producer(Protocol):
    """What samples ahead for :class:`AsyncGenerator`: the hf worker process (:class:`_WorkerHandle`) or the
    vllm-server sampling thread (``posttrain.generation._vllm_server.ServerSampler``). The bookkeeping (which job
    needs which weights, what is pending, ready, checkpointed) is the generator's; a producer only runs jobs."""

    def publish(self, version: int, model: Any) -> None:
        """Make the policy's current weights, as ``version``, the ones the next jobs sample from."""
        ...

    def submit(self, step: int, version: int, batches: list[dict]) -> None:
        """Queue the job of ``step``: sample its batches from weights ``version`` and score them."""
        ...

    def released(self, pending: dict[int, int]) -> bool:
        """Whether the weights may be overwritten now, given the jobs still ``pending`` (step -> version): the
        handshake that keeps the lag exact."""
        ...

    def receive(self, timeout: float, since: float) -> list[tuple]:
        """Messages sent, waiting up to ``timeout`` for the first; raises GenerationWorkerError on a failure, a
        death, or no progress since ``since`` for longer than async_generation_timeout."""
        ...

    def stop(self) -> None:
        """Stop (idempotent); unfinished work is never needed after it."""
        ...


class AsyncGenerator:
    """The training process's side of asynchronous generation: a :class:`~posttrain.generation.Generator` for the
    method and a ``RunService`` for the loop (``ctx.services["async_generation"]``).

    With the ``hf`` backend a worker process samples, and evaluation samples in this process from the policy
    itself (it needs the current weights, at once). With ``vllm-server`` a thread samples from the server, and
    evaluation samples from the server too, once the current weights may be pushed to it.
    """

    def __init__(self, ctx: TrainContext, params: SamplingParams, num_generations: int, rewards: RewardSet | None):
        config = ctx.config
        self.config, self.params = config, params
        self.num_generations, self.rewards = num_generations, rewards
        self.max_staleness = int(config.max_staleness)
        self.server = config.generation_backend == "vllm-server"
        if self.server:
            from posttrain.generation._vllm_server import VLLMServerGenerator

            self.name = "vllm-server-async"
            self.local: Any = VLLMServerGenerator(ctx, params)  # waits for the server; pushes and evaluation
            self.reports_logps = True  # the server's numerics differ from the trainer's even at K = 0
        else:
            from posttrain.generation._hf import HFGenerator

            self.name = "hf-async"
            # at K = 0 the samples are on-policy with the trainer's exact weights: no log-probs, no correction, as
            # the synchronous hf backend; stale samples need them for the importance-sampling correction
            self.reports_logps = self.max_staleness > 0 or config.importance_sampling_correction is True
            self.local = HFGenerator(ctx.model, params, config.generation_batch_size)
        self.model = ctx.model
        self.process_index = ctx.process_index
        self._worker: _Producer | None = None
        self._first = 0  # the weights version sampling started with
        self._step = 0  # ctx.step at the last on_step: the newest weights version
        self._published = -1  # the weights version the producer holds
        self._planned = -1  # the last step submitted or restored
        self._pending: dict[int, int] = {}  # step -> weights version: submitted, not yet received
        self._ready: dict[int, dict] = {}  # step -> {"version", "rollouts", "idle_seconds"}: received, not taken
        self._restored: dict[int, dict] = {}  # from a checkpoint, until sampling starts
        self._waited = 0.0  # trainer seconds spent waiting on the producer since the last batch was taken
        if "async_generation" in ctx.services:
            raise PluginError(
                "a second asynchronous generator was built for this run; build one in the method's setup and "
                "keep it (one per training process)"
            )
        ctx.services["async_generation"] = self

    # -- Generator protocol: evaluation ---------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None) -> Completions:
        return self.local.generate(prompt_ids, n, seeds)

    def sync_weights(self, model: Any) -> None:
        """Before evaluation samples. The server gets the current weights once no job needs older ones."""
        if not self.server:
            self.local.sync_weights(model)
        elif self._worker is None:  # sample() outside the loop's training, before any asynchronous job
            self.local.sync_weights(model)
        elif self._published != self._step:
            self._publish(model)

    # -- RunService protocol ----------------------------------------------------------------------------------

    def on_step(self, ctx: TrainContext) -> None:
        """Start sampling (first call), else publish the new weights when a job will need them and submit the
        jobs that came within reach (steps up to ctx.step + K)."""
        self._step = ctx.step
        if self._worker is None:
            self._start(ctx)
            return
        new = [u for u in ctx.upcoming_batches(self.max_staleness + 1) if u.step > self._planned]
        if not new:
            return  # no job needs these weights (batch_reuse): skip the copy
        if self._published != ctx.step:  # (evaluation may have pushed them already)
            self._publish(self.model)
        for upcoming in new:
            self._submit(upcoming)

    def state_dict(self) -> dict:
        """The batches sampled from weights older than the checkpoint's (waited for), plus any ready ones."""
        if self._worker is not None:
            needed = [s for s, version in self._pending.items() if version < self._step]
            self._waited += self._wait(lambda: all(s in self._ready for s in needed))
        kept = {**self._restored, **self._ready}
        if not kept:
            return {}
        batches = [{"step": s, "version": b["version"], "rollouts": b["rollouts"]} for s, b in sorted(kept.items())]
        return {"format": STATE_FORMAT, "max_staleness": self.max_staleness, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("format") != STATE_FORMAT:
            raise PosttrainError(
                f"the checkpoint's asynchronous-generation state has format {state.get('format')!r}, this posttrain "
                f"reads {STATE_FORMAT}; resume with the posttrain version that wrote it, or delete "
                "service_state_*.pt from the checkpoint (its samples are then drawn again, from newer weights)"
            )
        self._restored = {int(b["step"]): {**b, "idle_seconds": 0.0} for b in state["batches"]}

    def close(self) -> None:
        """Stop sampling (idempotent); unfinished work is never needed after the run."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self.server:
            self.local.close()

    # -- taking a batch -----------------------------------------------------------------------------------------

    def take(
        self, batches: list[dict], ctx: TrainContext, num_generations: int, rewards: RewardSet | None
    ) -> list[Rollout]:
        """The rollouts of step ``ctx.step``, waiting for the worker if it is behind."""
        if num_generations != self.num_generations or rewards is not self.rewards:
            raise PluginError(
                f"sample() was called with num_generations={num_generations} and rewards {_names(rewards)}, but the "
                f"generator was built with num_generations={self.num_generations} and rewards {_names(self.rewards)}; "
                "the asynchronous worker samples ahead, so pass the same values to build_generator(ctx, "
                "num_generations=..., rewards=...) as to sample()"
            )
        if self._worker is None:  # sample() used outside posttrain.loop.train, which calls on_step first
            self._step = ctx.step
            self._start(ctx)
        step = ctx.step
        if step not in self._ready and step not in self._pending:
            raise PosttrainError(
                f"no asynchronous batch was planned for step {step + 1} (planned: {sorted([*self._pending, *self._ready])}"
                "); the loop's upcoming_batches and its rollouts disagree. This is a bug in posttrain; please report "
                "it, and set async_generation false meanwhile"
            )
        waited = self._waited + self._wait(lambda: step in self._ready)
        self._waited = 0.0
        self._drain()  # count every batch that is ready by now
        batch = self._ready.pop(step)
        staleness = step - batch["version"]
        if not 0 <= staleness <= self.max_staleness:  # never train on a batch older than K steps
            raise PosttrainError(
                f"the batch for step {step + 1} was sampled from the weights of step {batch['version']}, "
                f"{staleness} steps old, beyond max_staleness {self.max_staleness}. This is a bug in posttrain; "
                "please report it, and set async_generation false meanwhile"
            )
        expected = [[int(r) for r in b["row_index"]] for b in batches]
        got = [list(r["row_index"]) for r in batch["rollouts"]]
        if got != expected:
            raise PosttrainError(
                f"the asynchronous batch for step {step + 1} holds dataset rows {got}, but the step trains on "
                f"{expected}. This is a bug in posttrain (the loop's upcoming_batches and its steps disagree); "
                "please report it, and set async_generation false meanwhile"
            )
        metrics = {
            "async/staleness": float(staleness),
            "async/queue_depth": float(sum(1 for s in self._ready if s > step)),
            "async/trainer_wait_seconds": waited,
            "async/generator_idle_seconds": float(batch["idle_seconds"]),
        }
        out = [_from_wire(wire, ctx.device) for wire in batch["rollouts"]]
        for rollout in out:
            rollout.metrics.update(metrics)
        return out

    # -- internals ------------------------------------------------------------------------------------------------

    def _start(self, ctx: TrainContext) -> None:
        """Start sampling on the current weights (version ctx.step) and submit the first K + 1 steps' jobs;
        batches restored from a checkpoint stand in for their jobs when they are not too old."""
        self._first = self._planned = ctx.step
        self._planned -= 1
        self._worker = self._launch(ctx)
        self._published = ctx.step
        for upcoming in ctx.upcoming_batches(self.max_staleness + 1):
            restored = self._restored.pop(upcoming.step, None)
            if restored is not None and 0 <= upcoming.step - restored["version"] <= self.max_staleness:
                self._ready[upcoming.step] = restored
                self._planned = upcoming.step
            else:
                self._submit(upcoming)
        self._restored.clear()

    def _launch(self, ctx: TrainContext) -> _Producer:
        """The producer, holding the weights of version ctx.step: the server's sampling thread, or a worker
        process with a copy of the policy."""
        config = copy.copy(self.config)
        config.async_generation = False  # the producer's sampling samples for real
        if self.server:
            from posttrain.generation._vllm_server import ServerSampler

            sampler = ServerSampler(self.local, ctx, config, self.num_generations, self.rewards)
            try:
                sampler.publish(ctx.step, self.model)
            except BaseException:
                sampler.stop()  # the run ends here: no thread is left waiting for jobs
                raise
            return sampler
        import torch

        self._check_picklable()
        spec = _WorkerSpec(
            config=config,
            tokenizer=ctx.tokenizer,
            params=self.params,
            rewards=self.rewards,
            num_generations=self.num_generations,
            report_logps=self.reports_logps,
            batch_size=self.config.generation_batch_size,
            threads=torch.get_num_threads(),
            device=str(ctx.device),
            model_class=type(_base_model(self.model)),
            model_config=_base_model(self.model).config,
            generation_config=getattr(self.model, "generation_config", None),
            process_index=self.process_index,
        )
        return _WorkerHandle(spec, self.model, ctx.step, self.config.async_generation_timeout)

    def _publish(self, model: Any) -> None:
        """Push the current weights (version self._step) once the producer releases the ones it holds: the
        worker process once every job that needs them has copied them, the server once every such job has
        finished sampling (its weights are the sampling weights)."""
        self._waited += self._wait(lambda: self._worker.released(self._pending))
        self._worker.publish(self._step, model)
        self._published = self._step

    def _submit(self, upcoming: UpcomingBatch) -> None:
        version = max(self._first, upcoming.step - self.max_staleness)
        if version > self._published:
            raise RuntimeError(f"job for step {upcoming.step} needs weights {version}, newer than {self._published}")
        self._worker.submit(upcoming.step, version, upcoming.batches)
        self._pending[upcoming.step] = version
        self._planned = upcoming.step

    def _wait(self, done: Callable[[], bool]) -> float:
        """Receive batches until ``done()``; returns the seconds waited. Raises GenerationWorkerError when the
        worker failed, died or made no progress for async_generation_timeout seconds."""
        start = time.time()
        while not done():
            for message in self._worker.receive(_POLL_SECONDS, since=start):
                self._accept(message)
        return time.time() - start

    def _drain(self) -> None:
        for message in self._worker.receive(0.0, since=time.time()):
            self._accept(message)

    def _accept(self, message: tuple) -> None:
        _, step, version, rollouts, idle = message
        self._pending.pop(step, None)
        self._ready[step] = {"version": version, "rollouts": rollouts, "idle_seconds": idle}

    def _check_picklable(self) -> None:
        """Every reward function must reach the worker; say which one cannot, and why, before it starts."""
        if self.rewards is None:
            return
        for name, func in zip(self.rewards.names, self.rewards.funcs):
            try:
                pickle.dumps(func)
            except Exception as exc:
                raise ConfigError(
                    f"reward function {name!r} cannot be sent to the generation worker process ({type(exc).__name__}: "
                    f"{exc}). With async_generation: true completions are scored in the worker, so every reward "
                    "function must be picklable: a function defined at the top level of an importable module (or of "
                    "the script that starts training, under `if __name__ == '__main__':`), a functools.partial of "
                    "one, or an instance of such a class; lambdas and nested functions are not. Move it to module "
                    "level, or set async_generation false"
                ) from exc


def _names(rewards: RewardSet | None) -> str:
    return "None" if rewards is None else "(" + ", ".join(rewards.names) + ")"


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the worker samples from the merged weights under its names)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


# -- the wire: rollouts as plain data (queue and checkpoint alike) -----------------------------------------------


def _to_wire(rollout: Rollout) -> dict:
    """A rollout as tensors, numbers, strings, lists and dicts: what a checkpoint may hold (weights_only)."""
    return {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}


def _from_wire(wire: dict, device: Any) -> Rollout:
    import torch

    from posttrain.generation import Rollout

    names = {f.name for f in dataclasses.fields(Rollout)}
    values = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in wire.items() if k in names}
    values["metrics"] = dict(values.get("metrics") or {})
    return Rollout(**values)


# -- the training process's handle on the worker ----------------------------------------------------------------


@dataclass
class _WorkerSpec:
    """Everything the worker needs, pickled once (after it has set sys.path, so user modules import)."""

    config: Any
    tokenizer: Any
    params: SamplingParams
    rewards: RewardSet | None
    num_generations: int
    report_logps: bool
    batch_size: int | None
    threads: int
    device: str
    model_class: type
    model_config: Any
    generation_config: Any
    process_index: int


def _mp_context(model_module: str) -> Any:
    """forkserver, spawn where there is none (Windows); never fork (CUDA state and OpenMP threads do not survive
    it). The forkserver imports torch, transformers and the model's module once, when the first worker of the
    process starts (seconds); every later worker forks from it in milliseconds."""
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions: shared memory, not copies)

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "transformers", model_module, "posttrain.generation", "posttrain.generation._hf", "posttrain.rewards"]
    )
    return context


class _WorkerHandle:
    """The worker process and what the two processes share: the weights and their version under a condition,
    the count of started jobs, the worker's phase and heartbeat, a job queue and a result queue."""

    def __init__(self, spec: _WorkerSpec, model: Any, version: int, timeout: float):
        import torch

        from posttrain.generation._vllm import policy_weights

        context = _mp_context(spec.model_class.__module__)
        self.timeout, self.process_index = timeout, spec.process_index
        self.shared = {name: torch.empty(t.shape, dtype=t.dtype).share_memory_() for name, t in policy_weights(model)}
        self.condition = context.Condition()
        self.version = context.Value("q", -1, lock=False)
        self.started = context.Value("q", -1, lock=False)  # the last step whose job copied its weights
        self.phase = context.Value("i", 0, lock=False)
        self.phase_step = context.Value("q", -1, lock=False)
        self.heartbeat = context.Value("d", time.time(), lock=False)
        self.jobs = context.Queue()
        self.results = context.Queue()
        self.stop_event = context.Event()
        self.publish(version, model)
        payload = pickle.dumps(spec)
        environment = {"sys_path": list(sys.path), "cwd": os.getcwd(), "env": dict(os.environ)}
        self.process = context.Process(
            target=_worker_main,
            args=(payload, environment, self.shared, self.condition, self.version, self.started, self.phase),
            kwargs={
                "phase_step": self.phase_step,
                "heartbeat": self.heartbeat,
                "jobs": self.jobs,
                "results": self.results,
                "stop_event": self.stop_event,
            },
            name=f"posttrain-generation-{spec.process_index}",
            daemon=True,  # never outlives the training process, even without close()
        )
        self.process.start()
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.stop_event, self.jobs)

    def publish(self, version: int, model: Any) -> None:
        """Write the policy's weights as ``version``; the worker copies them when a job needs that version."""
        import torch

        from posttrain.generation._vllm import policy_weights

        with self.condition, torch.no_grad():
            for name, tensor in policy_weights(model):
                self.shared[name].copy_(tensor.detach())
            self.version.value = version
            self.condition.notify_all()

    def submit(self, step: int, version: int, batches: list[dict]) -> None:
        self.jobs.put((step, version, batches))

    def released(self, pending: dict[int, int]) -> bool:
        """Every pending job has copied its weights out of shared memory (it may still be sampling)."""
        return self.started.value >= max(pending, default=-1)

    def receive(self, timeout: float, since: float) -> list[tuple]:
        """Batches the worker sent, waiting up to ``timeout`` for the first. Raises on a failure message, a dead
        worker, or no progress since ``since`` (or the last heartbeat) for longer than the timeout."""
        messages = self._collect(timeout)
        if not messages and not self.process.is_alive():
            # a worker that fails sends its report, then exits: the report may have reached the pipe only after
            # the wait above gave up, so look once more before calling it a silent death
            messages = self._collect(1.0)
            if not messages:
                raise GenerationWorkerError(self._death())
        for message in messages:
            if message[0] == "error":
                self.stop()
                raise GenerationWorkerError(self._failure(message[1]))
        # a fresh process imports torch and transformers first: on a slow disk that alone can take minutes
        limit = self.timeout if self.phase.value != PHASES.index("starting") else max(self.timeout, _STARTUP_SECONDS)
        if not messages and time.time() - max(since, self.heartbeat.value) > limit:
            doing = self._doing()
            self.stop()
            raise GenerationWorkerError(
                f"the generation worker of training process {self.process_index} (pid {self.process.pid}) made no "
                f"progress for {limit:.0f} s while {doing}; it was stopped. Raise async_generation_timeout if its "
                "batches are legitimately that slow, or look for a reward function that blocks; then continue with "
                "--resume_from_checkpoint latest, or set async_generation false to sample in the training process"
            )
        return messages

    def _collect(self, timeout: float) -> list[tuple]:
        try:
            return _drain(self.results, timeout)
        except (EOFError, OSError):  # the worker died while handing over a tensor (its descriptor socket closed)
            self.process.join(timeout=10)  # it is exiting; its exit code says why
            if not self.process.is_alive():
                raise GenerationWorkerError(self._death()) from None
            raise

    def _doing(self) -> str:
        phase = PHASES[self.phase.value] if 0 <= self.phase.value < len(PHASES) else "in an unknown phase"
        step = self.phase_step.value
        return f"{phase} (the batch for step {step + 1})" if step >= 0 else phase

    def _failure(self, report: dict) -> str:
        hint = (
            " Everything the worker unpickles at start (reward functions, the model class) must be importable "
            "there: a module on sys.path, or the script under `if __name__ == '__main__':`."
            if report["phase"] == "starting"
            else ""
        )
        return (
            f"the generation worker of training process {self.process_index} (pid {report['pid']}) failed while "
            f"{report['doing']}: {report['summary']}\n\nWorker traceback:\n{report['traceback']}\n"
            f"Training cannot continue without its samples.{hint} Fix the cause above, then continue from the last "
            "checkpoint with --resume_from_checkpoint latest, or set async_generation false to sample in the "
            "training process"
        )

    def _death(self) -> str:
        code = self.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        return (
            f"the generation worker of training process {self.process_index} (pid {self.process.pid}) {how} while "
            f"{self._doing()}, without reporting an error: something outside Python ended it (out of memory: the "
            "worker holds a second copy of the model; a signal; a crash in native code). Check memory and the "
            "system log, then continue with --resume_from_checkpoint latest, or set async_generation false"
        )

    def stop(self) -> None:
        self._finalizer()


def _drain(results: Any, timeout: float) -> list[tuple]:
    """Every message waiting in ``results`` (a thread's or a process's queue), waiting up to ``timeout`` seconds
    for the first one (not at all when ``timeout`` is 0)."""
    messages = []
    try:
        messages.append(results.get(timeout=timeout) if timeout > 0 else results.get_nowait())
        while True:
            messages.append(results.get_nowait())
    except queue.Empty:
        pass
    return messages


def _stop_process(process: Any, stop_event: Any, jobs: Any) -> None:
    """Ask the worker to stop, give it a moment to finish its call, then kill it (its work is not needed)."""
    stop_event.set()
    with contextlib.suppress(Exception):
        jobs.put(None)
    process.join(_STOP_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join(5.0)
    jobs.cancel_join_thread()  # never block interpreter exit on a job nobody will read


# -- the worker process ------------------------------------------------------------------------------------------


class _Status:
    """The producer's phase, the step it works for, and a heartbeat, for the trainer to read (in shared memory for
    the worker process, plain cells for the vllm-server sampling thread)."""

    def __init__(self, phase: Any, step: Any, heartbeat: Any):
        self._phase, self._step, self._heartbeat = phase, step, heartbeat

    def set(self, phase: str, step: int = -1) -> None:
        self._phase.value, self._step.value, self._heartbeat.value = PHASES.index(phase), step, time.time()

    @property
    def step(self) -> int:
        return self._step.value

    @property
    def heartbeat(self) -> float:
        return self._heartbeat.value

    def doing(self) -> str:
        phase, step = PHASES[self._phase.value], self._step.value
        return f"{phase} (the batch for step {step + 1})" if step >= 0 else phase


class _PhasedRewards:
    """The run's RewardSet, marking the worker's phase as "scoring" while reward functions run."""

    def __init__(self, rewards: RewardSet, status: _Status):
        self.rewards, self.status = rewards, status

    def score(self, *args: Any, **kwargs: Any) -> Any:
        self.status.set("scoring", self.status.step)
        return self.rewards.score(*args, **kwargs)

    def combine(self, per_func: Any) -> Any:
        return self.rewards.combine(per_func)

    def metrics(self, per_func: Any, combined: Any) -> dict[str, float]:
        return self.rewards.metrics(per_func, combined)


def _worker_main(
    payload: bytes,
    environment: dict,
    shared: dict,
    condition: Any,
    version: Any,
    started: Any,
    phase: Any,
    *,
    phase_step: Any,
    heartbeat: Any,
    jobs: Any,
    results: Any,
    stop_event: Any,
) -> None:
    """Entry point of the worker process: report any failure, with its traceback, instead of dying silently."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the trainer checkpoints first, then stops us
    status = _Status(phase, phase_step, heartbeat)
    status.set("starting")
    sys.path[:] = environment["sys_path"]  # a forkserver keeps the sys.path, cwd and environment of its start
    os.environ.clear()
    os.environ.update(environment["env"])
    with contextlib.suppress(OSError):
        os.chdir(environment["cwd"])
    try:
        spec = pickle.loads(payload)
        _serve(spec, shared, condition, version, started, status, jobs, results, stop_event)
    except BaseException as exc:
        report = {
            "pid": os.getpid(),
            "phase": PHASES[phase.value],
            "doing": status.doing(),
            "summary": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        results.put(("error", report))
        results.close()
        results.join_thread()  # the report must leave before the process does
        # Stay until the trainer has read it: batches sent earlier carry their tensors as file descriptors that
        # the trainer fetches from this process when it unpickles them, so exiting now would turn the report
        # into an unexplained death. The trainer stops us once it reads the report; a gone trainer ends the wait.
        parent = multiprocessing.parent_process()
        while not stop_event.wait(1.0):
            if parent is not None and not parent.is_alive():
                break
        os._exit(1)


def _serve(spec: _WorkerSpec, shared, condition, version, started, status, jobs, results, stop_event) -> None:
    import torch

    from posttrain._method import TrainContext
    from posttrain.generation import _forked_rng, generation_seed, sample
    from posttrain.generation._hf import HFGenerator

    torch.set_num_threads(spec.threads)
    model, targets = _build_model(spec, shared)
    generator = HFGenerator(model, spec.params, spec.batch_size, report_logps=spec.report_logps)
    rewards = _PhasedRewards(spec.rewards, status) if spec.rewards is not None else None
    parent = multiprocessing.parent_process()
    loaded = None  # the weights version in the model
    for (step, required, batches), job_wait in _jobs(jobs, stop_event, parent, status):
        idle_since = time.time()
        status.set("waiting for weights", step)
        with condition:
            while version.value < required:
                condition.wait(0.5)
                if stop_event.is_set() or (parent is not None and not parent.is_alive()):
                    return
            if version.value != required:
                raise RuntimeError(f"job for step {step} needs weights {required}, but {version.value} were published")
            if loaded != required:
                status.set("loading weights", step)
                with torch.no_grad():
                    for target, tensor in zip(targets, shared.values()):
                        target.copy_(tensor)
                loaded = required
            started.value = step
        idle = job_wait + (time.time() - idle_since)  # waiting for a job, then for its weights
        status.set("generating", step)
        ctx = TrainContext(config=spec.config, tokenizer=spec.tokenizer, model=model, step=step)
        # the batch's own random stream: the same samples whenever it runs, after a resume too
        with _forked_rng(generation_seed(spec.config.seed, f"async-{spec.process_index}", step, -1)):
            rollouts = sample(generator, model, batches, ctx, spec.num_generations, rewards)
        status.set("sending", step)
        results.put(("batch", step, required, [_to_wire(r) for r in rollouts], idle))


def _jobs(jobs: Any, stop_event: Any, parent: Any, status: _Status) -> Iterator[tuple[tuple, float]]:
    """(job, seconds waited for it) in order, until the trainer says stop (None) or is gone."""
    while True:
        status.set("waiting for a job")
        since = time.time()
        while True:
            try:
                job = jobs.get(timeout=0.5)
                break
            except queue.Empty:
                if stop_event.is_set() or (parent is not None and not parent.is_alive()):
                    return
        if job is None:
            return
        yield job, time.time() - since


def _build_model(spec: _WorkerSpec, shared: dict) -> tuple[Any, list]:
    """The policy's architecture from its config, on the trainer's device, with a parameter for every shared
    tensor (same names, shapes and dtypes); returns it and the parameters in the shared tensors' order."""
    import torch

    model = spec.model_class(spec.model_config)
    if spec.generation_config is not None:
        model.generation_config = copy.deepcopy(spec.generation_config)
    model.requires_grad_(False).eval()
    params = dict(model.named_parameters())
    missing = [n for n in shared if n not in params]
    unsent = [n for n in params if n not in shared]
    if missing or unsent:
        raise RuntimeError(
            f"the worker's {spec.model_class.__name__} does not match the policy's weights: the policy sends "
            f"{missing[:3]} it lacks, and it has {unsent[:3]} the policy does not send"
        )
    for name, tensor in shared.items():
        if params[name].shape != tensor.shape:
            raise RuntimeError(
                f"parameter {name}: worker shape {tuple(params[name].shape)}, policy {tuple(tensor.shape)}"
            )
        params[name].data = params[name].data.to(dtype=tensor.dtype)
    model.to(torch.device(spec.device))
    params = dict(model.named_parameters())
    return model, [params[name] for name in shared]
