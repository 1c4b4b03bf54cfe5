"""Asynchronous generation (``async_generation: true``): a worker process samples and scores ahead of the trainer.

Every run here trains the tiny model for a few steps with GRPO or RLOO and ``per_prompt_generation: true``, so
a completion depends only on (seed, step, row) and the sampling weights, in whichever process it is drawn. The
reward functions live in a module written to disk: the worker imports them as a user's would. Each run sets
``async_generation_timeout`` so a bug that stalls the worker fails the test within a minute instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import textwrap

import pytest
import torch
from posttrain import ConfigError, PosttrainError
from posttrain.generation import GenerationWorkerError
from posttrain.loop import train
from posttrain_grpo import GRPO, GRPOConfig
from posttrain_rloo import RLOO, RLOOConfig
from safetensors.torch import load_file

REWARDS = """
import os
import time


def digits(prompts, completions, **columns):
    # dense: the share of digits in the completion, so a random tiny model gets a signal
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def fails(prompts, completions, boom, **columns):
    if any(boom):
        raise ValueError("a row marked boom reached the reward")
    return digits(prompts, completions)


def dies(prompts, completions, boom, **columns):
    if any(boom):
        os._exit(7)
    return digits(prompts, completions)


def hangs(prompts, completions, boom, **columns):
    if any(boom):
        time.sleep(300)
    return digits(prompts, completions)
"""


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory):
    """The test rewards as an importable module (the worker process imports it by name)."""
    import importlib
    import sys

    root = tmp_path_factory.mktemp("async-rewards")
    (root / "posttrain_async_test_rewards.py").write_text(textwrap.dedent(REWARDS))
    sys.path.insert(0, str(root))
    yield importlib.import_module("posttrain_async_test_rewards")
    sys.path.remove(str(root))
    sys.modules.pop("posttrain_async_test_rewards", None)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(n: int = 32, boom: set[int] = frozenset()) -> list[dict]:
    return [{"prompt": f"echo {i % 10}", "boom": i in boom} for i in range(n)]


def run(method, model_dir, out, reward, *, rows_=None, callbacks=None, **fields):
    """A few steps of GRPO or RLOO on the tiny model: 2 micro-batches of 2 prompts x 4 completions per step."""
    config_class = GRPOConfig if isinstance(method, GRPO) else RLOOConfig
    name = getattr(reward, "__name__", "reward")
    values = dict(
        model=str(model_dir),
        output_dir=str(out),
        reward_funcs=[name],
        max_steps=4,
        learning_rate=3e-2,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=6,
        per_prompt_generation=True,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
        async_generation_timeout=60.0,
    )
    values.update(fields)
    config = config_class(**values)
    return train(method, config, train_dataset=rows_ or rows(), rewards={name: reward}, callbacks=callbacks)


def weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


def workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("posttrain-generation")]


STEP_KEYS = ("loss", "reward", "reward_std", "completions/mean_length", "grad_norm")


def step_rows(history: list[dict]) -> list[dict]:
    return [{k: row[k] for k in STEP_KEYS if k in row} for row in history if "loss" in row]


@pytest.mark.parametrize("method", [GRPO, RLOO])
def test_max_staleness_0_is_the_synchronous_algorithm(method, tiny_model_dir, tmp_path, rewards_module):
    """K = 0: the worker samples from the trainer's exact weights after every step, so completions, rewards,
    losses, gradient norms and the final weights are bit-identical to the synchronous run's."""
    sync = run(method(), tiny_model_dir, tmp_path / "sync", rewards_module.digits).log_history
    zero = run(
        method(), tiny_model_dir, tmp_path / "k0", rewards_module.digits, async_generation=True, max_staleness=0
    ).log_history
    assert step_rows(zero) == step_rows(sync)
    assert [row["async/staleness"] for row in zero] == [0.0] * 4
    assert not any(key.startswith("importance_sampling/") for row in zero for key in row)  # on-policy: no correction
    a, b = weights(tmp_path / "sync"), weights(tmp_path / "k0")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not workers()


def test_staleness_is_exactly_the_lag_and_off_policy_samples_are_corrected(tiny_model_dir, tmp_path, rewards_module):
    """K = 2: the batch of step s comes from the weights after max(0, s - 2) steps (0, 1, 2, 2, 2, 2 steps old),
    the loss is reweighted by the importance ratio, and the run differs from the synchronous one."""
    history = run(
        GRPO(),
        tiny_model_dir,
        tmp_path / "k2",
        rewards_module.digits,
        async_generation=True,
        max_staleness=2,
        max_steps=6,
    ).log_history
    assert [row["async/staleness"] for row in history] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert all(row["async/queue_depth"] <= 2 for row in history)
    assert all(row["async/trainer_wait_seconds"] >= 0 and row["async/generator_idle_seconds"] >= 0 for row in history)
    ratios = [row["importance_sampling/ratio_mean"] for row in history]
    assert ratios[0] == pytest.approx(1.0, abs=1e-4)  # fresh weights: only the engines' numerics differ
    assert any(abs(r - 1.0) > 1e-3 for r in ratios[2:])  # stale weights: a real correction
    sync = run(GRPO(), tiny_model_dir, tmp_path / "sync", rewards_module.digits, max_steps=6).log_history
    # step 1 samples from the same weights (only the importance weights' numerics differ); then the runs part
    assert history[0]["reward"] == sync[0]["reward"] and history[0]["grad_norm"] == pytest.approx(sync[0]["grad_norm"])
    assert [row["reward"] for row in history] != [row["reward"] for row in sync]


def test_batch_reuse_counts_staleness_at_the_rollout_step(tiny_model_dir, tmp_path, rewards_module):
    """num_iterations 2 (each rollout trains two steps), K = 1: rollouts at steps 0, 2, 4 come from the weights
    after 0, 1 and 3 steps; the reused steps log the rollout's own metrics."""
    history = run(
        GRPO(),
        tiny_model_dir,
        tmp_path / "reuse",
        rewards_module.digits,
        async_generation=True,
        max_staleness=1,
        num_iterations=2,
        max_steps=6,
    ).log_history
    assert [row["async/staleness"] for row in history] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("staleness", "reuse", "per_prompt"), [(2, 1, True), (2, 2, True), (1, 1, False)])
def test_interrupt_and_resume_are_exact(staleness, reuse, per_prompt, tiny_model_dir, tmp_path, rewards_module):
    """SIGINT at step 3: the trainer finishes the step, saves the batches sampled from older weights in the
    checkpoint (loadable with weights_only), stops the worker; resuming gives the uninterrupted run exactly
    (with batch_reuse 2 the checkpoint falls inside a rollout group; with batch-level sampling the worker's
    (seed, step) streams are drawn again identically)."""

    class InterruptAtStep3:
        def on_log(self, ctx, metrics):
            if metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)

    fields = dict(
        async_generation=True,
        max_staleness=staleness,
        num_iterations=reuse,
        max_steps=6,
        per_prompt_generation=per_prompt,
    )
    out = tmp_path / "run"
    first = run(GRPO(), tiny_model_dir, out, rewards_module.digits, callbacks=[InterruptAtStep3()], **fields)
    assert first.interrupted and first.global_step == 3
    assert not workers()
    saved = torch.load(out / "checkpoint-3" / "service_state_0.pt", weights_only=True)["async_generation"]
    versions = {b["step"]: b["version"] for b in saved["batches"]}
    assert all(step - version <= staleness and version < 3 for step, version in versions.items())
    resumed = run(GRPO(), tiny_model_dir, out, rewards_module.digits, resume_from_checkpoint="latest", **fields)
    full = run(GRPO(), tiny_model_dir, tmp_path / "full", rewards_module.digits, **fields)
    assert step_rows(resumed.log_history) == step_rows(full.log_history)[3:]
    a, b = weights(out), weights(tmp_path / "full")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_rloo_trains_asynchronously(tiny_model_dir, tmp_path, rewards_module):
    history = run(
        RLOO(), tiny_model_dir, tmp_path / "rloo", rewards_module.digits, async_generation=True, max_staleness=1
    ).log_history
    assert [row["async/staleness"] for row in history] == [0.0, 1.0, 1.0, 1.0]
    assert all("importance_sampling/ratio_mean" in row for row in history)


def boom_rows_of_step(step: int) -> set[int]:
    """The dataset rows the tiny runs train on at optimizer step ``step`` (counted from 0)."""
    from posttrain.loop import _step_rows

    micro_rows, _ = _step_rows(step, 32, 2, 2, 1, 0, 0)
    return {i for ix in micro_rows for i in ix}


# The worker's progress is a heartbeat at each phase change, so the timeout must exceed the longest phase the
# run has (sampling one batch: about 0.2 s here, seconds on a heavily loaded machine). A failure or a death is an
# event, and the timeout only bounds the test; a hang is found by the timeout: 20 s is about 100x the sampling.
@pytest.mark.parametrize(
    ("reward", "timeout", "expected"),
    [
        ("fails", 120.0, r"failed while scoring \(the batch for step 2\): RewardError: reward function 'fails' raised"),
        ("dies", 120.0, r"exited \(7\) while scoring \(the batch for step 2\), without reporting an error"),
        ("hangs", 20.0, r"made no progress for 20 s while scoring \(the batch for step 2\); it was stopped"),
    ],
)
def test_a_failing_worker_stops_the_run_with_a_clear_error(
    reward, timeout, expected, tiny_model_dir, tmp_path, rewards_module
):
    """A reward that raises, kills its process or blocks on the rows of step 2 (sampled while step 1 trains):
    the trainer names the worker's phase and step (and shows the traceback when there is one), stops it, and
    never hangs."""
    with pytest.raises(GenerationWorkerError, match=expected) as info:
        run(
            GRPO(),
            tiny_model_dir,
            tmp_path / reward,
            getattr(rewards_module, reward),
            rows_=rows(boom=boom_rows_of_step(1)),
            async_generation=True,
            max_staleness=1,
            async_generation_timeout=timeout,
        )
    message = str(info.value)
    assert "--resume_from_checkpoint latest" in message and "async_generation false" in message
    if reward == "fails":
        assert "Worker traceback:" in message and "posttrain_async_test_rewards.py" in message
    assert not workers()


def test_unpicklable_reward_is_refused_before_the_worker_starts(tiny_model_dir, tmp_path):
    def local_reward(prompts, completions, **columns):  # a closure: cannot be pickled by reference
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match="reward function 'local_reward' cannot be sent to the generation worker"):
        run(GRPO(), tiny_model_dir, tmp_path / "lambda", local_reward, async_generation=True)
    assert not workers()


def context_for(model_dir, **fields):
    """A TrainContext with the tiny policy, as a method's setup receives it."""
    from posttrain import TrainContext
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = GRPOConfig(model=str(model_dir), output_dir="unused", **fields)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return TrainContext(config=config, tokenizer=AutoTokenizer.from_pretrained(model_dir), model=model)


def test_a_method_that_does_not_say_what_it_samples_is_refused(tiny_model_dir):
    """build_generator(ctx) without num_generations (online DPO, distillation, a third-party method written before
    the asynchronous mode): async_generation is refused in setup, before any worker or service exists."""
    from posttrain.generation import build_generator

    ctx = context_for(tiny_model_dir, async_generation=True)
    with pytest.raises(ConfigError, match="does not support asynchronous generation. Set async_generation false"):
        build_generator(ctx)
    assert ctx.services == {} and not workers()


def test_a_batch_older_than_max_staleness_is_never_trained_on(tiny_model_dir):
    """The last guard before the loss: a batch whose sampling weights are more than max_staleness steps older than
    the step is refused (the fixed-lag schedule never produces one; this checks the guard itself)."""
    from posttrain.generation import build_generator

    class IdleWorker:  # a worker with nothing more to send
        def receive(self, timeout, since):
            return []

    ctx = context_for(tiny_model_dir, async_generation=True, max_staleness=1, num_generations=4)
    generator = build_generator(ctx, num_generations=4, rewards=None)
    generator._worker = IdleWorker()
    ctx.step = 3
    generator._ready = {3: {"version": 1, "rollouts": [], "idle_seconds": 0.0}}
    with pytest.raises(PosttrainError, match="weights of step 1, 2 steps old, beyond max_staleness 1"):
        generator.take([], ctx, 4, None)
    generator._ready = {3: {"version": 2, "rollouts": [], "idle_seconds": 0.0}}
    assert generator.take([], ctx, 4, None) == []  # one step old: within the bound
    generator._worker = None


def test_async_generation_refuses_the_in_process_vllm_engine():
    """hf (a worker process) and vllm-server (a thread driving the server) sample ahead; the in-process vllm
    engine shares the training process and its GPU, so it is refused when the config is checked."""
    problems = GRPOConfig(async_generation=True, generation_backend="vllm", max_staleness=-1).problems()
    assert any("async_generation cannot run with generation_backend 'vllm'" in p for p in problems)
    assert any("max_staleness must be >= 0" in p for p in problems)
    for backend in ("hf", "vllm-server"):
        assert GRPOConfig(async_generation=True, generation_backend=backend).problems() == []


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_checkpoints_and_leaves_no_process(tiny_model_dir, tmp_path):
    """Ctrl-C in a terminal reaches every process of the group, the worker included: the worker ignores it, the
    trainer finishes its step, checkpoints (with the worker's help) and exits 130, and no process of the run
    is left behind (worker, forkserver)."""
    import json
    import subprocess
    import sys
    import time

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n" for i in range(64))
    )
    out = tmp_path / "out"
    args = ["train", "grpo", "--model", tiny_model_dir, "--dataset", data, "--output_dir", out]
    args += ["--reward_funcs", "accuracy", "--max_steps", "500", "--logging_steps", "1", "--learning_rate", "1e-3"]
    args += ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6"]
    args += ["--async_generation", "true", "--max_staleness", "2", "--disable_progress_bar", "true"]
    env = {**os.environ, "POSTTRAIN_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, log
    assert "resumable checkpoint in" in log and "Traceback" not in log
    (checkpoint,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert (checkpoint / "service_state_0.pt").is_file()  # K = 2: batches of older weights were saved
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # is any process of the group still there?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a process of the interrupted run is still alive 30 s after it exited")
