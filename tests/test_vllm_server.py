"""The vllm-server backend against a fake server speaking the same HTTP routes as `vllm serve`.

The fake serves ``/v1/completions`` by sampling from its own copy of a tiny model, and receives weights the
way vLLM's NCCL weight-transfer engine would: a stand-in ``vllm.distributed.weight_transfer.nccl_engine``
hands the trainer's tensors to the server's ``/update_weights`` handler. So the test proves the routes, the
order of the control calls, the payloads, that pushed weights really change what the server samples, and
that training through the backend runs end to end. The real server is exercised on a GPU machine.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from posttrain import ConfigError, TrainContext
from posttrain.generation import OnlineConfig, build_generator, collate_prompts, prepare_prompts, sample
from posttrain.generation._vllm_server import SERVER_ROUTES, ServerError, server_command
from transformers import AutoModelForCausalLM, AutoTokenizer


class FakeVLLMServer:
    """`vllm serve` in miniature: OpenAI completions over token ids, and the weight-update control routes."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.calls: list[str] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.received = threading.Event()  # set when the stand-in NCCL "broadcast" has delivered the tensors
        self.update_info: dict | None = None
        self.paused = False
        self.updates = 0  # weight updates received: the version the server samples from, counted from 1
        self.sampled: list[tuple[int | None, int]] = []  # (request seed, updates) of every completion request
        self.lock = threading.Lock()  # one generation at a time, on the server's own random stream
        self.rng = torch.Generator().manual_seed(1234).get_state()  # the stream of requests without a seed
        self.trap: set[tuple[int, ...]] = set()  # prompts (token ids) whose request meets `trap_mode`
        self.trap_mode = "error"  # error: HTTP 500; die: the server stops answering; stall: no answer until `release`
        self.release = threading.Event()
        self.broken: set[str] = set()  # routes that answer HTTP 500
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body, status=200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.calls.append(self.path)
                if self.path == "/health":
                    return self._reply({})
                if self.path == "/v1/models":
                    return self._reply({"data": [{"id": "tiny"}]})
                if self.path == "/get_world_size":
                    return self._reply({"world_size": 1})
                return self._reply({"detail": "not found"}, 404)

            def do_POST(self):
                route = self.path.split("?")[0]
                server.calls.append(route)
                if route in server.broken:
                    return self._reply({"detail": f"planted failure of {route}"}, 500)
                length = int(self.headers.get("Content-Length") or 0)
                if route == "/test_deliver":  # the stand-in NCCL "broadcast" from another process
                    server.pending = torch.load(io.BytesIO(self.rfile.read(length)), weights_only=True)
                    server.received.set()
                    return self._reply({})
                body = json.loads(self.rfile.read(length) or b"{}")
                if route == "/v1/completions":
                    if server.trap and any(tuple(p) in server.trap for p in body["prompt"]):
                        if server.trap_mode == "error":
                            return self._reply({"detail": "planted engine failure"}, 500)
                        if server.trap_mode == "die":  # as a killed server: no answer, the port closed
                            threading.Thread(target=server.close).start()
                            self.close_connection = True
                            return None
                        server.release.wait(timeout=300)
                    return self._reply(server.complete(body))
                if route == "/update_weights":
                    server.update_info = body["update_info"]
                    assert server.received.wait(timeout=300), "no weights arrived"  # vLLM blocks in its NCCL recv
                    server.received.clear()
                    with torch.no_grad():
                        params = dict(server.model.named_parameters())
                        for name, tensor in server.pending.items():
                            params[name].copy_(tensor)
                    server.updates += 1
                    return self._reply({})
                if route == "/pause":
                    server.paused = True
                if route == "/resume":
                    server.paused = False
                return self._reply({})

        self.closed, self.lock_close = False, threading.Lock()

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not server.closed:  # a stalled request answered after close finds its client gone
                    super().handle_error(request, client_address)

        self.http = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def complete(self, body):
        """Deterministic given the request: a seed's own stream, else the server's stream (never the global one
        of the process, which the trainer shares here)."""
        assert not self.paused, "sampling while the server is paused for a weight update"
        with self.lock, torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(self.rng)
            out = self._complete(body)
            if "seed" not in body:
                self.rng = torch.random.get_rng_state()
            self.sampled.append((body.get("seed"), self.updates))
        assert not self.paused, "the weights changed while the server was sampling"
        return out

    @torch.no_grad()
    def _complete(self, body):
        choices = []
        for p, prompt in enumerate(body["prompt"]):
            if "seed" in body:
                torch.manual_seed(body["seed"])
            ids = torch.tensor([prompt] * body["n"])
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                max_new_tokens=body["max_tokens"],
                top_k=None if body["top_k"] == -1 else body["top_k"],
                eos_token_id=body["stop_token_ids"],
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[:, ids.size(1) :]
            logps = torch.log_softmax(torch.stack(out.logits, 1).float() / body["temperature"], -1)
            logps = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for k in range(body["n"]):
                tokens = new[k].tolist()
                end = next((i for i, t in enumerate(tokens) if t in body["stop_token_ids"]), None)
                keep = len(tokens) if end is None else end + 1
                choices.append(
                    {
                        "index": p * body["n"] + k,
                        "token_ids": tokens[:keep],
                        "logprobs": {"token_logprobs": logps[k, :keep].tolist()},
                        "finish_reason": "length" if end is None else "stop",
                    }
                )
        return {"choices": choices}

    def close(self):
        with self.lock_close:
            if not self.closed:
                self.closed = True
                self.release.set()
                self.http.shutdown()
                self.http.server_close()


@pytest.fixture
def fake_server(tiny_model_dir):
    server = FakeVLLMServer(tiny_model_dir)
    yield server
    server.close()


@pytest.fixture
def nccl_stand_in(fake_server, vllm_stand_in):
    """vLLM's trainer-side NCCL engine, standing in: the 'broadcast' lands in the fake server's buffer."""
    record = {}

    def deliver(tensors):
        fake_server.pending = tensors
        fake_server.received.set()

    vllm_stand_in(deliver, record)
    return record


def make_ctx(model_dir, url, **fields):
    config = OnlineConfig(
        model=str(model_dir), generation_backend="vllm-server", vllm_server_url=url, max_completion_length=4, **fields
    )
    return TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        model_path=str(model_dir),
    )


def prompts_batch(ctx, prompts):
    return collate_prompts(prepare_prompts([{"prompt": p} for p in prompts], ctx.tokenizer, "t"), 0)


def test_sampling_through_the_server_and_the_weight_update_protocol(tiny_model_dir, fake_server, nccl_stand_in):
    ctx = make_ctx(tiny_model_dir, fake_server.url)
    generator = build_generator(ctx)
    assert generator.reports_logps and fake_server.calls[:2] == ["/health", "/v1/models"]
    (r,) = sample(generator, ctx.model, [prompts_batch(ctx, ["ab", "abcd"])], ctx, num_generations=3)
    assert r.completion_ids.shape[0] == 6 and r.sampling_logps.shape == r.completion_ids.shape
    control = [c for c in fake_server.calls if c not in ("/health", "/v1/models", "/v1/completions")]
    assert control == [
        "/get_world_size",
        "/init_weight_transfer_engine",
        "/pause",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/resume",
    ]
    assert "lm_head.weight" in fake_server.update_info["names"]
    (init,) = nccl_stand_in["inits"]
    assert init.backend == "nccl" and init.world_size == 2 and init.rank == 0  # one server worker + the trainer
    # the server's log-probs are the ones its (synced) model assigns: recompute them on the trainer
    from posttrain.ops import completion_logps

    trainer, _ = completion_logps(ctx.model, r.input_ids, r.attention_mask, r.completion_ids.size(1))
    mask = r.completion_mask.bool()
    assert torch.allclose(trainer[mask], r.sampling_logps[mask], atol=1e-4)


def test_pushed_weights_change_what_the_server_samples(tiny_model_dir, fake_server, nccl_stand_in):
    """After the trainer's weights move, the next step's sync makes the server's model equal to them, and the
    server's log-probs are those of the moved model."""
    from posttrain.ops import completion_logps

    ctx = make_ctx(tiny_model_dir, fake_server.url)
    generator = build_generator(ctx)
    sample(generator, ctx.model, [prompts_batch(ctx, ["ab"])], ctx, num_generations=2)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ctx.step = 1
    (r,) = sample(generator, ctx.model, [prompts_batch(ctx, ["ab"])], ctx, num_generations=2)
    server = dict(fake_server.model.named_parameters())
    assert all(torch.equal(p, server[n]) for n, p in ctx.model.named_parameters())
    trainer, _ = completion_logps(ctx.model, r.input_ids, r.attention_mask, r.completion_ids.size(1))
    mask = r.completion_mask.bool()
    assert torch.allclose(trainer[mask], r.sampling_logps[mask], atol=1e-4) and len(nccl_stand_in["inits"]) == 1


def test_training_grpo_through_the_server(tiny_model_dir, fake_server, nccl_stand_in, tmp_path):
    import posttrain
    from posttrain_grpo import GRPO, GRPOConfig

    config = GRPOConfig(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / "run"),
        generation_backend="vllm-server",
        vllm_server_url=fake_server.url,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=3,
        max_steps=3,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
    )
    rows = [{"prompt": f"{i}+1="} for i in range(8)]
    history = posttrain.train(
        GRPO(), config, train_dataset=rows, rewards={"one": lambda prompts, completions, **c: [1.0] * len(completions)}
    ).log_history
    assert len([h for h in history if "loss" in h]) == 3
    assert "importance_sampling/ratio_mean" in history[0]  # the server reports log-probs: corrected by default
    assert nccl_stand_in["sends"] == 3  # one push per optimizer step


def test_no_server_is_a_clear_error_with_the_command(tiny_model_dir):
    ctx = make_ctx(tiny_model_dir, "http://127.0.0.1:9", vllm_server_timeout=0.5)
    with pytest.raises(ConfigError, match=r"found no vLLM server at http://127.0.0.1:9.*vllm serve"):
        build_generator(ctx)


def test_server_errors_name_the_route(tiny_model_dir, fake_server):
    ctx = make_ctx(tiny_model_dir, fake_server.url)
    generator = build_generator(ctx)
    with pytest.raises(ServerError, match="answered /nowhere with HTTP 404"):
        generator._request("GET", "/nowhere")


def test_the_documented_command_and_routes():
    command = server_command("./my-model", port=8001)
    assert "VLLM_SERVER_DEV_MODE=1 vllm serve ./my-model --port 8001" in command
    assert '"backend": "nccl"' in command and "processed_logprobs" in command
    assert "/update_weights" in SERVER_ROUTES and "/v1/completions" in SERVER_ROUTES


# -- asynchronous generation with the server (async_generation: true) ------------------------------------------
# The sampling thread requests each step's completions from the fake server while the trainer trains. Every run
# samples per prompt (per_prompt_generation), so a request's completions are a function of its seed and the
# server's weights; the fake records, for every request, how many weight updates it had received.


def digits(prompts, completions, **columns):
    """A dense reward: the share of digits in the completion, so a random tiny model gets a signal."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


STEP_KEYS = ("loss", "reward", "reward_std", "completions/mean_length", "grad_norm", "importance_sampling/ratio_mean")


def step_rows(history):
    return [{k: row[k] for k in STEP_KEYS if k in row} for row in history if "loss" in row]


def train_with_server(model_dir, out, url, *, rows=None, callbacks=None, **fields):
    """GRPO on the tiny model through the server: 2 micro-batches of 2 prompts x 4 completions per step."""
    import posttrain
    from posttrain_grpo import GRPO, GRPOConfig

    values = dict(
        model=str(model_dir),
        output_dir=str(out),
        generation_backend="vllm-server",
        vllm_server_url=url,
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
    rows = rows or [{"prompt": f"echo {i % 10}"} for i in range(32)]
    return posttrain.train(
        GRPO(), GRPOConfig(**values), train_dataset=rows, rewards={"digits": digits}, callbacks=callbacks
    )


def sampled_steps(server, steps, mode="train"):
    """For each request of ``mode`` the server answered: (the step it was for, the weight updates it had)."""
    from posttrain.generation import generation_seed

    step_of = {generation_seed(0, mode, s, r): s for s in range(steps + 1) for r in range(32)}
    return sorted({(step_of[seed], updates) for seed, updates in server.sampled if seed in step_of})


def final_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_async_max_staleness_0_is_the_synchronous_server_run(
    tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """K = 0: each step's batch is sampled by the thread from the weights the trainer just pushed, so
    completions, rewards, importance ratios, losses, gradient norms and final weights equal the synchronous run's
    exactly, with the same pushes (one per step)."""
    sync = train_with_server(tiny_model_dir, tmp_path / "sync", fake_server.url).log_history
    sync_sampled, sync_sends = sampled_steps(fake_server, 4), nccl_stand_in["sends"]
    fake_server.sampled, fake_server.updates = [], 0
    zero = train_with_server(
        tiny_model_dir, tmp_path / "k0", fake_server.url, async_generation=True, max_staleness=0
    ).log_history
    assert step_rows(zero) == step_rows(sync) and len(step_rows(zero)) == 4
    assert all("importance_sampling/ratio_mean" in row for row in zero)  # the server's log-probs: corrected
    assert [row["async/staleness"] for row in zero] == [0.0] * 4
    assert sampled_steps(fake_server, 4) == sync_sampled == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert nccl_stand_in["sends"] - sync_sends == sync_sends == 4
    a, b = final_weights(tmp_path / "sync"), final_weights(tmp_path / "k0")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not [t for t in threading.enumerate() if t.name.startswith("posttrain-generation")]


def test_async_max_staleness_1_samples_from_weights_one_step_old(
    tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """K = 1: the server samples the batch of step s after max(1, s) weight updates (the initial push, then one
    per step that a job needs: none for the step after the last), never while a push pauses it (the fake
    asserts that); the stale batches are corrected by the importance ratio, and the run differs from sync."""
    history = train_with_server(
        tiny_model_dir, tmp_path / "k1", fake_server.url, async_generation=True, max_staleness=1, max_steps=5
    ).log_history
    assert [row["async/staleness"] for row in history] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert sampled_steps(fake_server, 5) == [(0, 1), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert nccl_stand_in["sends"] == 4  # versions 0-3; no job needs the weights after the 4th step
    assert all(row["async/queue_depth"] <= 1 for row in history)
    assert all(row["async/trainer_wait_seconds"] >= 0 and row["async/generator_idle_seconds"] >= 0 for row in history)
    ratios = [row["importance_sampling/ratio_mean"] for row in history]
    assert ratios[0] == pytest.approx(1.0, abs=1e-4)  # fresh weights: only the numerics differ
    assert all(abs(r - 1.0) > 1e-3 for r in ratios[1:])  # one step old: a real correction
    fake_server.sampled, fake_server.updates = [], 0
    sync = train_with_server(tiny_model_dir, tmp_path / "sync", fake_server.url, max_steps=5).log_history
    assert step_rows(history)[0] == step_rows(sync)[0]
    assert [row["reward"] for row in history] != [row["reward"] for row in sync]


def test_async_evaluation_samples_from_the_server_with_the_current_weights(
    tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """K = 2, evaluation after steps 2 and 4. No job needs the weights of step 2, so evaluation pushes them,
    after the job of step 4 (weights 1) has finished; training batches keep their fixed lag."""
    import posttrain
    from posttrain_grpo import GRPO, GRPOConfig

    config = GRPOConfig(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / "eval"),
        generation_backend="vllm-server",
        vllm_server_url=fake_server.url,
        max_steps=4,
        eval_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        per_prompt_generation=True,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        async_generation=True,
        max_staleness=2,
        async_generation_timeout=60.0,
        seed=0,
    )
    rows = [{"prompt": f"echo {i % 10}"} for i in range(32)]
    result = posttrain.train(GRPO(), config, train_dataset=rows, eval_dataset=rows[:4], rewards={"digits": digits})
    assert [row["step"] for row in result.log_history if "eval_loss" in row] == [2, 4]
    assert [row["async/staleness"] for row in result.log_history if "loss" in row] == [0.0, 1.0, 2.0, 2.0]
    assert sampled_steps(fake_server, 4) == [(0, 1), (1, 1), (2, 1), (3, 2)]
    assert sampled_steps(fake_server, 4, "eval") == [(2, 3), (4, 4)]


@pytest.mark.parametrize("staleness", [1, 2])
def test_async_server_interrupt_and_resume_are_exact(
    staleness, tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """SIGINT at step 3: the checkpoint holds the batches sampled from older weights; the resumed run pushes its
    weights to the server again and equals the uninterrupted run exactly."""
    import os
    import signal

    class InterruptAtStep3:
        def on_log(self, ctx, metrics):
            if metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)

    fields = dict(async_generation=True, max_staleness=staleness, max_steps=6)
    out = tmp_path / "run"
    first = train_with_server(tiny_model_dir, out, fake_server.url, callbacks=[InterruptAtStep3()], **fields)
    assert first.interrupted and first.global_step == 3
    saved = torch.load(out / "checkpoint-3" / "service_state_0.pt", weights_only=True)["async_generation"]
    assert [(b["step"], b["version"]) for b in saved["batches"]] == [
        (3 + i, 3 + i - staleness) for i in range(staleness)
    ]
    resumed = train_with_server(tiny_model_dir, out, fake_server.url, resume_from_checkpoint="latest", **fields)
    full = train_with_server(tiny_model_dir, tmp_path / "full", fake_server.url, **fields)
    assert step_rows(resumed.log_history) == step_rows(full.log_history)[3:]
    a, b = final_weights(out), final_weights(tmp_path / "full")
    assert all(torch.equal(a[name], b[name]) for name in a)


# A failure and a death are events the thread reports; a stall is found by async_generation_timeout, which must
# exceed the longest phase of a healthy run (sampling one batch: about 0.5 s here, seconds on a loaded machine).
@pytest.mark.parametrize(
    ("mode", "timeout", "expected"),
    [
        ("error", 120.0, r"failed in training process 0 while generating \(the batch for step 2\): ServerError: "),
        ("die", 120.0, r"failed in training process 0 while generating \(the batch for step 2\): ServerError: .* did "),
        ("stall", 10.0, r"made no progress for 10 s while training process 0 was generating \(the batch for step 2\)"),
    ],
)
def test_async_server_failure_stops_the_run_with_a_clear_error(
    mode, timeout, expected, tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """The server answers the prompts of step 2 (sampled while step 1 trains) with HTTP 500, dies, or never
    answers: the trainer names the server, the step and what it was doing, and never hangs."""
    import time

    from posttrain.generation import GenerationWorkerError
    from posttrain.loop import _step_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": f"echo {i}"} for i in range(32)]
    micro_rows, _ = _step_rows(1, 32, 2, 2, 1, 0, 0)
    fake_server.trap = {tuple(tokenizer(rows[i]["prompt"]).input_ids) for ix in micro_rows for i in ix}
    fake_server.trap_mode = mode
    start = time.monotonic()
    with pytest.raises(GenerationWorkerError, match=expected) as info:
        train_with_server(
            tiny_model_dir,
            tmp_path / mode,
            fake_server.url,
            rows=rows,
            async_generation=True,
            max_staleness=1,
            async_generation_timeout=timeout,
        )
    message = str(info.value)
    assert fake_server.url in message and "--resume_from_checkpoint latest" in message
    if mode == "error":
        assert "HTTP 500: " in message and "planted engine failure" in message and "traceback" in message
    assert time.monotonic() - start < 120  # a stall costs the timeout, never a hang


def test_async_server_failing_the_first_push_leaves_no_thread(
    tiny_model_dir, fake_server, nccl_stand_in, tmp_path, one_thread
):
    """The weights are pushed when sampling starts; a server that refuses them stops the run at once with the
    route and the server's answer, and no sampling thread is left behind."""
    from posttrain.generation._vllm_server import ServerError

    fake_server.broken = {"/start_weight_update"}
    with pytest.raises(ServerError, match=r"pushing the weights to the vLLM server http://\S+ failed \(HTTPError: "):
        train_with_server(tiny_model_dir, tmp_path / "push", fake_server.url, async_generation=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("posttrain-generation") and t.is_alive()]


def test_async_server_pushes_after_every_process_finished_its_jobs(tiny_model_dir, fake_server):
    """With several training processes the server's weights change only after every process's jobs of the old
    weights have finished: each process waits for its own (``released``), then all meet at a barrier before the
    push, as in synchronous training every process takes part in the push."""
    from posttrain.generation._vllm_server import ServerSampler, VLLMServerGenerator

    calls = []

    class TwoProcesses:
        num_processes, process_index = 2, 0

        def wait_for_everyone(self):
            calls.append("barrier")

    ctx = make_ctx(tiny_model_dir, fake_server.url)
    ctx.accelerator = TwoProcesses()
    client = VLLMServerGenerator(ctx, None)
    client.sync_weights = lambda model: calls.append("push")
    sampler = ServerSampler(client, ctx, ctx.config, 2, None)
    try:
        assert not sampler.released({3: 2}) and sampler.released({})  # a job still sampling holds the weights
        sampler.publish(5, ctx.model)
        assert calls == ["barrier", "push"] and sampler.version == 5
    finally:
        sampler.stop()
    assert not sampler.thread.is_alive()


TWO_PROCESS_SCRIPT = """
import io, json, os, sys, urllib.request
sys.path.insert(0, sys.argv[1])  # the tests' conftest: the stand-in vLLM weight-transfer modules
import pytest, torch
from conftest import _install_vllm_stand_in
import posttrain
from posttrain_grpo import GRPO, GRPOConfig

url, model, out = sys.argv[2:5]


def deliver(tensors):
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    urllib.request.urlopen(urllib.request.Request(url + "/test_deliver", data=buffer.getvalue()), timeout=300).read()


def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


_install_vllm_stand_in(pytest.MonkeyPatch(), deliver, {})
config = GRPOConfig(model=model, output_dir=out, generation_backend="vllm-server", vllm_server_url=url, max_steps=4,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                    max_completion_length=6, per_prompt_generation=True, logging_steps=1, save_steps=0,
                    disable_progress_bar=True, seed=0, async_generation=True, max_staleness=1,
                    async_generation_timeout=120.0)
rows = [{"prompt": f"echo {i % 10}"} for i in range(32)]
result = posttrain.train(GRPO(), config, train_dataset=rows, rewards={"digits": digits})
if int(os.environ.get("RANK", "0")) == 0:
    staleness = [row["async/staleness"] for row in result.log_history if "loss" in row]
    open(out + "/staleness.json", "w").write(json.dumps(staleness))
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_async_server_with_two_training_processes(tiny_model_dir, fake_server, tmp_path):
    """Two processes (torchrun, gloo) train asynchronously through one server with K = 1: each samples its own
    prompts from a thread while the steps overlap, the server's weights change only when neither process is
    sampling (the fake asserts it on every request), and every request of step s met max(1, s) updates."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "run.py").write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), str(tmp_path / "run.py"), str(Path(__file__).parent), fake_server.url]
    command += [str(tiny_model_dir), str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "staleness.json").read_text()) == [0.0, 1.0, 1.0, 1.0]
    requests = sampled_steps(fake_server, 4)
    assert requests == [(0, 1), (1, 1), (2, 2), (3, 3)]
    assert len(fake_server.sampled) == 4 * 4  # 4 steps x 4 prompts (2 per process), one request each
