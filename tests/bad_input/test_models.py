"""Bad input, class "models": a path typo, a hub name offline, a missing tokenizer, remote code, an unknown
architecture, lengths past the position table. Each is one line, fast: never a hub lookup with retries and
chained tracebacks."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from bad_input_catalogue import LM, Case, cli, run_case, train

LM_FILE = {"lm.jsonl": LM}
D = ["--dataset", "{tmp}/lm.jsonl"]


def remote_code_model(dest, paths):
    """A model whose config.json asks for code from its directory; the code would create a marker file."""
    shutil.copytree(paths["model"], dest)
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = "markerformer"
    config["auto_map"] = {"AutoConfig": "configuration.MarkerConfig", "AutoModelForCausalLM": "modeling.MarkerLM"}
    (dest / "config.json").write_text(json.dumps(config))
    marker = f"from pathlib import Path\nPath({str(paths['tmp'] / 'MARKER')!r}).write_text('ran')\n"
    (dest / "configuration.py").write_text(
        marker + "from transformers import LlamaConfig\n\n\nclass MarkerConfig(LlamaConfig):\n"
        "    model_type = 'markerformer'\n"
    )
    (dest / "modeling.py").write_text(
        marker + "from transformers import LlamaForCausalLM\n\nfrom .configuration import MarkerConfig\n\n\n"
        "class MarkerLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n"
    )


CASES = [
    Case("model-missing", train("sft", *D, "--model", "{tmp}/nomodel"), 2,
         ["'{tmp}/nomodel' does not exist"], ["a directory saved with save_pretrained"], LM_FILE),
    Case("model-relative-path-typo", train("sft", *D, "--model", "models/tiyn"), 2,
         ["model path 'models/tiyn' does not exist"], ["pass a directory saved with save_pretrained"],
         {**LM_FILE, "models/tiny/config.json": "{}"}),
    Case("model-dir-without-config", train("sft", *D, "--model", "{tmp}/plain"), 2,
         ["'{tmp}/plain' has no config.json"], ["point at the directory that save_pretrained wrote"],
         {**LM_FILE, "plain/weights.bin": "x"}),
    Case("model-not-a-causal-lm", train("sft", *D, "--model", "{bert}"), 2,
         ["{bert}", "cannot be loaded as AutoModelForCausalLM"], ["a causal language model"], LM_FILE),
    Case("no-model-given", train("sft", *D, "--model", ""), 2, ["no model given"], ["pass --model PATH"], LM_FILE),
    Case("tokenizer-without-pad-or-eos", train("sft", *D, "--model", "{noeos}"), 2,
         ["'{noeos}' has neither a pad nor an EOS token"], ["add_special_tokens({{'pad_token'"], LM_FILE),
    Case("tokenizer-without-pad-token-pads-with-eos", train("sft", *D, "--model", "{nopad}"), 0, ["done: 2 steps"],
         [], LM_FILE),
    Case("model-without-tokenizer", train("sft", *D, "--model", "{notokenizer}"), 2,
         ["model directory '{notokenizer}' has no tokenizer"], ["tokenizer.save_pretrained('{notokenizer}')"], LM_FILE),
    Case("model-type-unknown-to-transformers", train("sft", *D, "--model", "{unknowntype}"), 2,
         ["'{unknowntype}' has a model type ('zzzformer' in config.json)"], ["upgrade transformers"], LM_FILE),
    Case("model-needs-remote-code", train("sft", *D, "--model", "{tmp}/remote"), 2,
         ["'{tmp}/remote' needs custom code", "runs with your permissions"], ["--trust_remote_code true"],
         {**LM_FILE, "remote": remote_code_model}),
    Case("hub-name-while-offline", train("sft", *D, "--model", "someorg/some-model"), 2,
         ["model 'someorg/some-model' is not a local directory", "HF_HUB_OFFLINE=1 is set"],
         ["Check the path", "pass its directory"], LM_FILE, {"HF_HUB_OFFLINE": "1"}),
    Case("hub-name-without-network", train("sft", *D, "--model", "someorg/some-model"), 2,
         ["model 'someorg/some-model' is not a local directory", "127.0.0.1 cannot be reached"],
         ["Check the path"], LM_FILE, {"HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("max-length-past-position-table", train("sft", *D, "--max_length", "600"), 2,
         ["max_length is 600 but the model at '{model}' has positions for 512 tokens"], ["Set it to 512 or less"],
         LM_FILE),
    Case("default-max-length-lowered-with-a-warning", train("sft", *D), 0,
         ["max_length defaults to 1024", "has positions for 512 tokens", "using max_length 512"],
         ["Set --max_length"], LM_FILE),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model_case(case, paths, watched, monkeypatch):
    monkeypatch.chdir(paths["tmp"])
    start = time.monotonic()
    run_case(case, paths, monkeypatch, watched)
    assert time.monotonic() - start < 20, "a model problem took a hub round of retries to report"
    assert not (paths["tmp"] / "MARKER").exists(), "code from the model directory ran"


def test_remote_code_runs_only_when_asked(paths, monkeypatch):
    """With --trust_remote_code true the directory's code is what loads the model (the marker proves it)."""
    remote_code_model(paths["tmp"] / "remote", paths)
    (paths["tmp"] / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LM))
    outcome = cli("train", "sft", "--model", paths["tmp"] / "remote", "--dataset", paths["tmp"] / "lm.jsonl",
                  "--output_dir", paths["tmp"] / "out", "--max_steps", "1", "--per_device_train_batch_size", "2",
                  "--disable_progress_bar", "--trust_remote_code", "true")  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert (paths["tmp"] / "MARKER").read_text() == "ran"


def test_pickled_weights_in_a_model_directory_never_run(paths):
    """A ``pytorch_model.bin`` holding a pickle payload: transformers loads .bin files with weights_only."""
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(paths["tmp"] / "MARKER"), "w"))

    model = paths["tmp"] / "binmodel"
    shutil.copytree(paths["model"], model)
    (model / "model.safetensors").unlink()
    torch.save({"weight": Payload()}, model / "pytorch_model.bin")
    (paths["tmp"] / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LM))
    outcome = cli("train", "sft", "--model", model, "--dataset", paths["tmp"] / "lm.jsonl", "--output_dir",
                  paths["tmp"] / "out", "--max_steps", "1", "--disable_progress_bar")  # fmt: skip
    assert outcome.code == 2 and "Traceback" not in outcome.err, outcome.err
    assert f"cannot load the model at '{model}': its weights file holds Python objects" in outcome.err
    assert not (paths["tmp"] / "MARKER").exists()
