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

import json
import time
import urllib.error
import urllib.request
from typing import Any

from posttrain._errors import ConfigError, PosttrainError
from posttrain.generation import Completions, SamplingParams
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
