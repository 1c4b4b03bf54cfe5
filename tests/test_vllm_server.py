"""The vllm-server backend against a fake server speaking the same HTTP routes as `vllm serve`.

The fake serves ``/v1/completions`` by sampling from its own copy of a tiny model, and receives weights the
way vLLM's NCCL weight-transfer engine would: a stand-in ``vllm.distributed.weight_transfer.nccl_engine``
hands the trainer's tensors to the server's ``/update_weights`` handler. So the test proves the routes, the
order of the control calls, the payloads, that pushed weights really change what the server samples, and
that training through the backend runs end to end. The real server is exercised on a GPU machine.
"""

from __future__ import annotations

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
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if route == "/v1/completions":
                    return self._reply(server.complete(body))
                if route == "/update_weights":
                    server.update_info = body["update_info"]
                    assert server.received.wait(timeout=300), "no weights arrived"  # vLLM blocks in its NCCL recv
                    server.received.clear()
                    with torch.no_grad():
                        params = dict(server.model.named_parameters())
                        for name, tensor in server.pending.items():
                            params[name].copy_(tensor)
                    return self._reply({})
                if route == "/pause":
                    server.paused = True
                if route == "/resume":
                    server.paused = False
                return self._reply({})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @torch.no_grad()
    def complete(self, body):
        assert not self.paused, "sampling while the server is paused for a weight update"
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
        self.http.shutdown()


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
