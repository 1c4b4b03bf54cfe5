"""The ``vllm-server`` backend: a stock ``vllm serve`` process, driven over HTTP.

Start the server on GPUs the trainer does not use (``posttrain vllm-serve-command MODEL`` prints it)::

    VLLM_SERVER_DEV_MODE=1 CUDA_VISIBLE_DEVICES=1 vllm serve ./my-model --port 8000 \\
        --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs

Sampling uses the OpenAI-compatible ``/v1/completions`` route with token-id prompts (``return_token_ids``,
``logprobs: 0``). Weights go through vLLM's native weight-transfer API: ``WeightTransferTrainerFactory`` with
the NCCL engine and vLLM's ``HTTPVLLMWeightSyncClient`` drive the control routes (``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``) while the main training process
broadcasts over an NCCL group with the server's workers; generation is paused (``/pause``, ``/resume``) around
each push. Sampling requests use only the standard library.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from traceback import format_exc
from typing import Any

from posttrain._errors import ConfigError, PosttrainError
from posttrain.generation import Completions, SamplingParams
from posttrain.generation._async import (
    _STOP_GRACE_SECONDS,
    GenerationWorkerError,
    _drain,
    _jobs,
    _PhasedRewards,
    _Status,
    _to_wire,
)
from posttrain.generation._vllm import vllm_sampling_kwargs

SERVER_ROUTES = (
    "/health",
    "/v1/models",
    "/v1/completions",
    "/get_world_size",
    "/pause",
    "/resume",
    "/init_weight_transfer_engine",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
)


def server_command(model: str, port: int = 8000, gpu_memory_utilization: float = 0.9, dtype: str = "auto") -> str:
    """The shell command that starts a vLLM server this backend can drive."""
    return (
        f"VLLM_SERVER_DEV_MODE=1 vllm serve {model} --port {port} --dtype {dtype} "
        f"--gpu-memory-utilization {gpu_memory_utilization} "
        '--weight-transfer-config \'{"backend": "nccl"}\' --logprobs-mode processed_logprobs'
    )


class ServerError(PosttrainError):
    """The vLLM server answered with an error or not at all; names the route and the server."""


class VLLMServerGenerator:
    """Client of a ``vllm serve`` process; the main training process pushes weights, every process samples."""

    name = "vllm-server"
    reports_logps = True

    def __init__(self, ctx: Any, params: SamplingParams, request_timeout: float = 600.0):
        config = ctx.config
        self.url = config.vllm_server_url.rstrip("/")
        self.params = params
        self.request_timeout = request_timeout
        self.accelerator = ctx.accelerator
        self.rank = ctx.process_index
        self.main = self.rank == 0
        self._wait_until_ready(config.vllm_server_timeout, ctx.model_path or "MODEL")
        models = self._request("GET", "/v1/models")["data"]
        self.model_name = models[0]["id"]
        self.transfer = None  # the trainer-side NCCL engine, created at the first push

    # -- HTTP ------------------------------------------------------------------------------------------

    def _request(self, method: str, route: str, body: dict | None = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + route, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as response:
                text = response.read().decode() or "null"
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerError(f"vLLM server {self.url} answered {route} with HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ServerError(
                f"vLLM server {self.url} did not answer {route} ({exc}); check that it is running and reachable"
            ) from None
        return json.loads(text)

    def _wait_until_ready(self, timeout: float, model: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("GET", "/health", timeout=5)
                return
            except ServerError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"generation_backend 'vllm-server' found no vLLM server at {self.url} after {timeout:.0f} s "
                        f"({exc}). Start one on GPUs the trainer does not use, e.g. `{server_command(model)}`, or "
                        "set vllm_server_url."
                    ) from None
            time.sleep(1.0)

    # -- sampling -----------------------------------------------------------------------------------------

    def generate(
        self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None, images: list | None = None
    ) -> Completions:
        if images is not None and any(images):
            raise ConfigError(
                "generation_backend is vllm-server, but the prompts have images and the server is driven through "
                "/v1/completions with token ids, which carries no images. Use generation_backend hf, or vllm (in "
                "process) for a vision-language model."
            )
        start = time.perf_counter()
        base = vllm_sampling_kwargs(self.params, n)
        base.update({"model": self.model_name, "return_token_ids": True, "skip_special_tokens": False})
        requests = (
            [({**base, "prompt": [ids], "seed": seed}, 1) for ids, seed in zip(prompt_ids, seeds)]
            if seeds is not None
            else [({**base, "prompt": prompt_ids}, len(prompt_ids))]
        )
        token_ids, truncated, logps = [], [], []
        for body, n_prompts in requests:
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != n_prompts * n:
                raise ServerError(
                    f"vLLM server {self.url} returned {len(choices)} completions for {n_prompts} prompts x {n}"
                )
            for choice in choices:
                ids = list(choice["token_ids"])
                token_ids.append(ids)
                truncated.append(choice.get("finish_reason") == "length")
                lps = (choice.get("logprobs") or {}).get("token_logprobs") or [0.0] * len(ids)
                logps.append([float(x) for x in lps])
        return Completions(token_ids, truncated, logps, time.perf_counter() - start)

    # -- weights ------------------------------------------------------------------------------------------

    def sync_weights(self, model: Any) -> None:
        """Every process runs the trainer-side engine (FSDP shards are gathered collectively); the main one
        opens the NCCL group, drives the control routes and sends. Generation is paused meanwhile."""
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient, WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from posttrain.generation._vllm import policy_source

        if self.transfer is None or self.transfer.source.module is not model:
            host, port = _free_endpoint()
            world = int(self._request("GET", "/get_world_size")["world_size"]) + 1  # server workers + the sender
            init = NCCLTrainerInitInfo(
                master_address=host, master_port=port, world_size=world, rank=0 if self.main else self.rank
            )
            self.transfer = WeightTransferTrainerFactory.trainer_init(
                init, client=HTTPVLLMWeightSyncClient(self.url), source=policy_source(model)
            )
        if self.main:
            self._request("POST", "/pause", {"mode": "keep"})
        try:
            self.transfer.send_weights()  # start_weight_update, update_weights with the broadcast, finish
        except Exception as exc:  # vLLM's client raises its HTTP library's errors, which do not name the server
            raise ServerError(
                f"pushing the weights to the vLLM server {self.url} failed ({type(exc).__name__}: {exc}); check "
                "the server's log, and that it runs with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
                f"(`{server_command('MODEL')}`)"
            ) from exc
        finally:
            if self.main:
                self._request("POST", "/resume", {})
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.shutdown()
        self.transfer = None


def _free_endpoint() -> tuple[str, int]:
    """This host's address and a free port for the NCCL rendezvous (the trainer is the TCPStore master)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return socket.gethostbyname(socket.gethostname()), port


# -- asynchronous generation: a thread samples from the server while the trainer trains -------------------------


class ServerSampler:
    """The vllm-server backend's producer for ``async_generation``: a thread of the training process that
    requests the queued steps' completions from the server and scores them while the trainer trains.

    The server is already a process of its own, so no worker process is needed, and its weights are the
    sampling weights, one version at a time. Hence the handshake with the trainer is "finished"-based: the
    trainer pushes version v only after every job that samples from v - 1 has finished (``released``), and
    the jobs that need v are submitted after the push. With several training processes each samples its own
    prompts, as the synchronous backend does, and they meet at a barrier before the push, so no process's
    job of the old version is still sampling while the server's weights change.
    """

    def __init__(self, client: VLLMServerGenerator, ctx: Any, config: Any, num_generations: int, rewards: Any):
        self.client = client
        # the trainer reports a stall after async_generation_timeout; the thread's request then ends by itself
        self.sampler = copy.copy(client)
        self.sampler.request_timeout = 2 * config.async_generation_timeout
        self.accelerator, self.process_index = ctx.accelerator, ctx.process_index
        self.config, self.tokenizer, self.num_generations = config, ctx.tokenizer, num_generations
        self.timeout = config.async_generation_timeout
        self.version = -1  # the weights version the server holds
        self.status = _Status(_Cell(0), _Cell(-1), _Cell(time.time()))
        self.rewards = _PhasedRewards(rewards, self.status) if rewards is not None else None
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self._main, name=f"posttrain-generation-{self.process_index}", daemon=True
        )
        self.thread.start()

    # -- the trainer's side --------------------------------------------------------------------------------

    def publish(self, version: int, model: Any) -> None:
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every process's jobs of the old weights have finished
        self.client.sync_weights(model)
        self.version = version

    def submit(self, step: int, version: int, batches: list[dict]) -> None:
        self.jobs.put((step, version, batches))

    def released(self, pending: dict[int, int]) -> bool:
        """Every submitted job has finished sampling: the server's weights are no longer needed."""
        return not pending

    def receive(self, timeout: float, since: float) -> list[tuple]:
        messages = _drain(self.results, timeout)
        for message in messages:
            if message[0] == "error":
                self.stop()
                raise GenerationWorkerError(self._failure(message[1]))
        if not messages and not self.thread.is_alive():  # it reports every exception; this is a bug guard
            raise GenerationWorkerError(
                f"the vllm-server sampling thread of training process {self.process_index} ended while "
                f"{self.status.doing()} without reporting an error; continue with --resume_from_checkpoint latest, "
                "or set async_generation false"
            )
        if not messages and time.time() - max(since, self.status.heartbeat) > self.timeout:
            doing = self.status.doing()
            self.stop()
            raise GenerationWorkerError(
                f"the vLLM server {self.client.url} made no progress for {self.timeout:.0f} s while training process "
                f"{self.process_index} was {doing}; its sampling was abandoned. Check the server (its log, its "
                "GPUs, whether it is paused), raise async_generation_timeout if its batches are legitimately that "
                "slow, or look for a reward function that blocks; then continue with --resume_from_checkpoint "
                "latest, or set async_generation false"
            )
        return messages

    def stop(self) -> None:
        """Ask the thread to stop; a request in flight cannot be cancelled, it ends by its own timeout (the
        thread is a daemon and its results are never read)."""
        self.stop_event.set()
        self.jobs.put(None)
        if self.thread is not threading.current_thread():
            self.thread.join(_STOP_GRACE_SECONDS)

    def _failure(self, report: dict) -> str:
        return (
            f"asynchronous sampling from the vLLM server {self.client.url} failed in training process "
            f"{self.process_index} while {report['doing']}: {report['summary']}\n\nSampling thread traceback:\n"
            f"{report['traceback']}\nTraining cannot continue without its samples. Fix the cause above (the "
            "server's log says more when it answered with an error or stopped answering), then continue from "
            "the last checkpoint with --resume_from_checkpoint latest, or set async_generation false"
        )

    # -- the thread ------------------------------------------------------------------------------------------

    def _main(self) -> None:
        """Run jobs in order; report any failure, with its traceback, instead of ending silently."""
        from posttrain._method import TrainContext
        from posttrain.generation import _sample_synced

        try:
            for (step, version, batches), idle in _jobs(self.jobs, self.stop_event, None, self.status):
                if self.version != version:  # the handshake guarantees it; a bug otherwise
                    raise RuntimeError(
                        f"the job for step {step} needs weights {version}, the server has {self.version}"
                    )
                self.status.set("generating", step)
                ctx = TrainContext(config=self.config, tokenizer=self.tokenizer, step=step)
                rollouts = _sample_synced(self.sampler, batches, ctx, self.num_generations, self.rewards)
                self.status.set("sending", step)
                self.results.put(("batch", step, version, [_to_wire(r) for r in rollouts], idle))
        except BaseException as exc:
            summary = f"{type(exc).__name__}: {exc}"
            self.results.put(("error", {"doing": self.status.doing(), "summary": summary, "traceback": format_exc()}))


class _Cell:
    """A value the thread writes and the trainer reads (the worker process's shared ``Value``, in-process)."""

    def __init__(self, value: Any):
        self.value = value
