"""The ``vllm-server`` backend: a stock ``vllm serve`` process, driven over HTTP.

Start the server on GPUs the trainer does not use (``posttrain vllm-serve-command MODEL`` prints it)::

    VLLM_SERVER_DEV_MODE=1 CUDA_VISIBLE_DEVICES=1 vllm serve ./my-model --port 8000 \\
        --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs

Sampling uses the OpenAI-compatible ``/v1/completions`` route with token-id prompts (``return_token_ids``,
``logprobs: 0``). Weights go through vLLM's native weight-transfer API: the HTTP control routes
(``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``,
``/pause``, ``/resume``) and an NCCL group between the main training process and the server's workers.
Only the standard library talks HTTP here.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from posttrain._errors import ConfigError, PosttrainError
from posttrain.generation import Completions, SamplingParams
from posttrain.generation._vllm import policy_weights, vllm_sampling_kwargs

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
        self.main = ctx.process_index == 0
        self._wait_until_ready(config.vllm_server_timeout, ctx.model_path or "MODEL")
        models = self._request("GET", "/v1/models")["data"]
        self.model_name = models[0]["id"]
        self.group = None  # the NCCL weight-transfer group, created at the first push

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

    def generate(self, prompt_ids: list[list[int]], n: int, seeds: list[int] | None = None) -> Completions:
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
        """Main process: pause the server, send every weight over NCCL, resume. Others wait for it."""
        if self.main:
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerSendWeightsArgs,
                NCCLWeightTransferEngine,
            )

            if self.group is None:
                self.group = self._init_group(NCCLWeightTransferEngine)
            names, dtypes, shapes = [], [], []
            for name, tensor in policy_weights(model):
                names.append(name)
                dtypes.append(str(tensor.dtype).split(".")[-1])
                shapes.append(list(tensor.shape))
            self._request("POST", "/pause", {"mode": "keep"})
            try:
                self._request("POST", "/start_weight_update", {"is_checkpoint_format": True})
                info = {"update_info": {"names": names, "dtype_names": dtypes, "shapes": shapes, "packed": True}}
                receiver = _Background(lambda: self._request("POST", "/update_weights", info))
                NCCLWeightTransferEngine.trainer_send_weights(
                    policy_weights(model), NCCLTrainerSendWeightsArgs(group=self.group, packed=True)
                )
                receiver.join()
                self._request("POST", "/finish_weight_update", {})
            finally:
                self._request("POST", "/resume", {})
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _init_group(self, engine: Any) -> Any:
        import socket

        world = int(self._request("GET", "/get_world_size")["world_size"]) + 1  # server workers + this process
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        host = socket.gethostbyname(socket.gethostname())
        init = {"master_address": host, "master_port": port, "rank_offset": 1, "world_size": world}
        remote = _Background(lambda: self._request("POST", "/init_weight_transfer_engine", {"init_info": init}))
        group = engine.trainer_init({"master_address": host, "master_port": port, "world_size": world})
        remote.join()
        return group

    def close(self) -> None:
        self.group = None


class _Background:
    """Run one HTTP call on a thread (the server blocks in its NCCL receive while we send); re-raise its error."""

    def __init__(self, call: Any):
        self.error: BaseException | None = None

        def run() -> None:
            try:
                call()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
