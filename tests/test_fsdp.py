"""FSDP2 on two CPU processes (gloo) equals one process, with LoRA too; sharded checkpoints resume exactly; a hung
or dead rank is named.

The two-process runs go through the shipped ``configs/launch/fsdp2.yaml`` (full shard, CPU-RAM-efficient
loading, sharded state dict) with ``accelerate launch --num_processes 2``, ``posttrain train
--accelerate_config`` or ``torchrun -m posttrain``, as a user would start them. One process runs in this
test process.

Tolerances: FSDP2 reduce-scatters (averages) each gradient over the two processes, where one process sums
the whole batch in one pass, so the float32 sums are added in a different order (relative error about
1e-7 per operation; measured: losses within 2e-7 relative, weights within 1.1e-7 after 4 AdamW steps at
lr 1e-3). 1e-5 leaves two orders of magnitude for that and still fails on any real difference: a wrong
gradient scale shows in ``grad_norm`` (compared too, as AdamW itself is scale-invariant), a wrong shard or
a missed row in the losses of the next steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

LAUNCH = Path(__file__).resolve().parents[1] / "core" / "src" / "posttrain" / "configs" / "launch"
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("fsdp")]
TIMEOUT = 300  # seconds per launched run (about 30-40 s on two busy CPU cores)

#: one script for every launched run: the method and fields come from a JSON file
SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
spec = json.loads(open(sys.argv[1]).read())
sys.path.insert(0, spec["toy_dir"])
from posttrain.config import build_config
from posttrain.loop import train

def digits(prompts, completions, **columns):
    return [sum(c.isdigit() for c in x) / (1 + len(x)) for x in completions]

if spec["method"] == "toy":
    import posttrain_toy_method as toy
    method, config_class = toy.Toy(), toy.ToyConfig
else:
    from posttrain_grpo import GRPO, GRPOConfig
    method, config_class = GRPO(), GRPOConfig
rows = [json.loads(line) for line in open(spec["dataset"])]
result = train(method, build_config(config_class, spec["fields"]), train_dataset=rows, rewards={"digits": digits})
if int(os.environ.get("RANK", "0")) == 0:
    open(os.path.join(spec["fields"]["output_dir"], "history.json"), "w").write(json.dumps(result.log_history))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(tmp: Path, name: str, method: str, dataset: Path, fields: dict, toy_source: str) -> subprocess.Popen:
    """``accelerate launch --config_file fsdp2.yaml --num_processes 2 script.py spec.json`` (not waited for)."""
    (tmp / "posttrain_toy_method.py").write_text(toy_source)
    (tmp / "run.py").write_text(SCRIPT)
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"method": method, "toy_dir": str(tmp), "dataset": str(dataset), "fields": fields}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "fsdp2.yaml")]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), str(tmp / "run.py"), str(spec)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())


def finish(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the launched run did not finish in {TIMEOUT} s:\n{out[-4000:]}")
    assert process.returncode == 0, out[-4000:]
    return out


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def column(history: list[dict], key: str) -> list[float]:
    return [row[key] for row in history if key in row]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOY_ROWS = [{"text": ("abc " * (1 + i % 7)) + str(i)} for i in range(32)]


def toy_fields(model: Path, out: Path, batch: int, **extra) -> dict:
    return {
        "model": str(model),
        "output_dir": str(out),
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "max_grad_norm": 1.0,  # the gradient norms (~1.1-2) are clipped: a wrong scale changes the update
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "disable_progress_bar": True,
        "seed": 0,
        **extra,
    }


def train_here(toy_module, fields: dict):
    from posttrain.config import build_config
    from posttrain.loop import train

    return train(toy_module.Toy(), build_config(toy_module.ToyConfig, fields), train_dataset=TOY_ROWS)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, tiny_model_dir, toy_module):
    """The toy method (next-token cross-entropy, i.e. SFT) for 4 steps with checkpoint-2: 2 FSDP2 processes
    (batch 2 each) launched, and meanwhile 1 process (batch 4) here."""
    tmp = tmp_path_factory.mktemp("fsdp-toy")
    source = Path(toy_module.__file__).read_text()
    dataset = write_rows(tmp / "rows.jsonl", TOY_ROWS)
    two = launch(tmp, "two", "toy", dataset, toy_fields(tiny_model_dir, tmp / "two", 2), source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train_here(toy_module, toy_fields(tiny_model_dir, tmp / "one", 4)).log_history
    finish(two)
    return tmp, one, json.loads((tmp / "two" / "history.json").read_text()), source


def test_fsdp2_two_processes_equal_one(toy_runs):
    tmp, one, two, _ = toy_runs
    assert column(two, "loss") == pytest.approx(column(one, "loss"), rel=1e-5)
    assert column(two, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5)
    assert max_diff(weights(tmp / "one"), weights(tmp / "two")) < 1e-5


def test_fsdp2_checkpoint_is_sharded_and_the_final_model_consolidated(toy_runs):
    tmp, *_ = toy_runs
    checkpoint = tmp / "two" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    assert {"config.json", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not list((tmp / "two").glob(".tmp-*"))  # written atomically: nothing half-written is left
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp / "two")  # one ordinary save_pretrained directory
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (tmp / "two" / "run_complete.json").is_file()


def test_sharded_checkpoint_resumes_exactly_on_two_processes(toy_runs, tiny_model_dir):
    tmp, _, full, source = toy_runs
    shutil.copytree(tmp / "two" / "checkpoint-2", tmp / "resumed2" / "checkpoint-2")
    fields = toy_fields(tiny_model_dir, tmp / "resumed2", 2, resume_from_checkpoint="latest")
    finish(launch(tmp, "resumed2", "toy", tmp / "rows.jsonl", fields, source))
    resumed = json.loads((tmp / "resumed2" / "history.json").read_text())
    # the same processes, shards and reduction order as the uninterrupted run: equal to rounding of the reload
    assert column(resumed, "loss") == pytest.approx(column(full, "loss")[2:], rel=1e-6)
    assert max_diff(weights(tmp / "two"), weights(tmp / "resumed2")) < 1e-6


def test_sharded_checkpoint_resumes_on_one_process(toy_runs, tiny_model_dir, toy_module):
    """torch.distributed.checkpoint re-slices the shards: the 2-process checkpoint resumes in one process
    (batch 4 = 2 x 2, the same rows per step) and ends where the uninterrupted 2-process run ended."""
    tmp, _, full, _ = toy_runs
    shutil.copytree(tmp / "two" / "checkpoint-2", tmp / "resumed1" / "checkpoint-2")
    shutil.copy(tmp / "two" / "posttrain_config.yaml", tmp / "resumed1" / "posttrain_config.yaml")
    fields = toy_fields(
        tiny_model_dir,
        tmp / "resumed1",
        4,
        resume_from_checkpoint="latest",
        resume_override=["per_device_train_batch_size"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = train_here(toy_module, fields).log_history
    assert column(resumed, "loss") == pytest.approx(column(full, "loss")[2:], rel=1e-5)
    assert max_diff(weights(tmp / "two"), weights(tmp / "resumed1")) < 1e-5


def test_planted_pickle_in_sharded_metadata_is_refused(toy_runs, tiny_model_dir, toy_module):
    """The sharded format's .metadata is a pickle: it is read by an unpickler that knows only the checkpoint
    metadata classes, so a planted payload is refused before anything runs."""
    import pickle

    tmp, *_ = toy_runs
    bad = tmp / "planted" / "checkpoint-2"
    shutil.copytree(tmp / "two" / "checkpoint-2", bad)
    marker = tmp / "planted" / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))
    fields = toy_fields(tiny_model_dir, tmp / "planted", 4, resume_from_checkpoint="latest")
    from posttrain import PosttrainError

    with pytest.raises(PosttrainError, match="not a plain file of tensors and data"):
        train_here(toy_module, {**fields, "resume_override": ["per_device_train_batch_size"]})
    assert not marker.exists()


DPO_WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box"]
DPO_ROWS = [
    {"prompt": f"say {w}{i}", "chosen": f" {w} {w} please", "rejected": f" {w[::-1]} no"}
    for i in range(4)
    for w in DPO_WORDS
]


def dpo_args(model: Path, dataset: Path, out: Path, batch: int) -> list[str]:
    fields = {
        "model": model,
        "dataset": dataset,
        "output_dir": out,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 2,
        "max_length": 64,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": "true",
        "seed": 0,
    }
    return [arg for name, value in fields.items() for arg in (f"--{name}", str(value))]


def history_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_fsdp2_and_torchrun_ddp_equal_one_process(tmp_path, tiny_model_dir):
    """DPO with its frozen reference model (sharded like the policy under FSDP2), started three ways:
    ``posttrain train --accelerate_config fsdp2`` (FSDP2), ``torchrun -m posttrain train`` (DDP), and one
    process here; the same losses, gradient norms and weights."""
    pytest.importorskip("posttrain_dpo")
    from posttrain.cli.train import run

    dataset = write_rows(tmp_path / "pairs.jsonl", DPO_ROWS)
    posttrain = [sys.executable, "-m", "posttrain", "train", "dpo"]
    launcher = ["--accelerate_config", "fsdp2", "--num_processes", "2", "--main_process_port", str(free_port())]
    fsdp = subprocess.Popen(
        [*posttrain, *dpo_args(tiny_model_dir, dataset, tmp_path / "fsdp", 2), *launcher],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "posttrain", "train", "dpo"]
    ddp = subprocess.Popen(
        [*torchrun, *dpo_args(tiny_model_dir, dataset, tmp_path / "ddp", 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run("train", ["dpo", *dpo_args(tiny_model_dir, dataset, tmp_path / "one", 4)]) == 0
    assert "accelerate.commands.launch --config_file" in finish(fsdp)  # the command it started is printed
    finish(ddp)
    one = history_of(tmp_path / "one")
    assert column(one, "loss")[0] == pytest.approx(0.6931472, abs=1e-6)  # step 1: policy == reference
    for name in ("fsdp", "ddp"):
        other = history_of(tmp_path / name)
        assert column(other, "loss") == pytest.approx(column(one, "loss"), rel=1e-5), name
        assert column(other, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5), name
        assert max_diff(weights(tmp_path / "one"), weights(tmp_path / name)) < 1e-5, name


def test_grpo_fsdp2_generates_and_trains_like_one_process(tmp_path, tiny_model_dir, toy_module):
    """GRPO with HF generation on the FSDP2-sharded policy (every process all-gathers each layer per decode
    step and keeps stepping until all are done) and a sharded KL reference (beta > 0). per_prompt_generation
    seeds each prompt's samples, so both runs score the same completions; GRPO's loss is a difference of
    nearly equal terms (about 1e-5 here), so it is compared absolutely, at the scale of the terms (1e-6)."""
    pytest.importorskip("posttrain_grpo")
    from posttrain.config import build_config
    from posttrain_grpo import GRPO, GRPOConfig

    dataset = write_rows(tmp_path / "prompts.jsonl", [{"prompt": f"echo {i}"} for i in range(16)])

    def fields(out: Path, batch: int) -> dict:
        return {
            "model": str(tiny_model_dir),
            "output_dir": str(out),
            "reward_funcs": ["digits"],
            "max_steps": 2,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": batch,  # completions: 2 prompts x 4 per process
            "num_generations": 4,
            "max_completion_length": 6,
            "beta": 0.04,
            "per_prompt_generation": True,
            "logging_steps": 1,
            "save_steps": 0,
            "disable_progress_bar": True,
            "seed": 0,
        }

    two = launch(tmp_path, "grpo", "grpo", dataset, fields(tmp_path / "two", 4), Path(toy_module.__file__).read_text())

    def digits(prompts, completions, **columns):  # the same reward as the launched script's
        return [sum(c.isdigit() for c in x) / (1 + len(x)) for x in completions]

    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from posttrain.loop import train

        one = train(
            GRPO(),
            build_config(GRPOConfig, fields(tmp_path / "one", 8)),
            train_dataset=rows,
            rewards={"digits": digits},
        ).log_history
    finish(two)
    two_history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert column(two_history, "reward") == pytest.approx(column(one, "reward"), rel=1e-6)  # same completions
    assert column(two_history, "loss") == pytest.approx(column(one, "loss"), abs=1e-6)
    assert column(two_history, "kl") == pytest.approx(column(one, "kl"), rel=1e-4, abs=1e-9)
    assert column(two_history, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5


def test_a_hung_process_is_named_with_what_it_was_doing(tmp_path, tiny_model_dir, toy_module):
    """Process 1 hangs inside its loss at step 2; process 0 waits in the gradient reduction, gives up after
    ddp_timeout and reports which process stopped answering and what each was doing. The timeout (20 s) also
    bounds start-up and loading, where one process may lag the other by seconds on a busy machine."""
    dataset = write_rows(tmp_path / "rows.jsonl", TOY_ROWS)
    fields = toy_fields(tiny_model_dir, tmp_path / "hang", 2, hang_at_step=1, ddp_timeout=20, save_steps=0)
    process = launch(tmp_path, "hang", "toy", dataset, fields, Path(toy_module.__file__).read_text())
    out, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert "RankFailure: process 0 of 2 failed in a collective call" in out, out[-4000:]
    assert "process 0: backward on micro-batch 1 of 2 at step 2" in out, out[-4000:]  # waiting for 1's gradients
    assert "process 1: computing the loss on micro-batch 1 of 2 at step 2" in out, out[-4000:]
    assert "Process 1 stopped answering (it hung, or took longer than ddp_timeout=20 s)" in out, out[-4000:]


@pytest.mark.parametrize("die_by", ["exit", "raise"])
def test_a_dead_process_is_named_with_what_it_was_doing(tmp_path, tiny_model_dir, toy_module, die_by):
    """Process 1 dies inside its loss at step 2, by os._exit(1) (no error of its own: as the OOM killer or a
    segfault would end it) or by raising. Process 0, waiting for its gradients, fails at once (its peer's
    connection closed) rather than after ddp_timeout, and names process 1, what it was doing and its error.
    ddp_timeout is 120 s and process 1's record is at most 60 s old when process 0 reports (measured: 0-3 s), so
    a survivor that waited for the timeout fails the test."""
    dataset = write_rows(tmp_path / "rows.jsonl", TOY_ROWS)
    fields = toy_fields(tiny_model_dir, tmp_path / "die", 2, die_at_step=1, die_by=die_by, ddp_timeout=120)
    fields["save_steps"] = 0
    process = launch(tmp_path, "die", "toy", dataset, fields, Path(toy_module.__file__).read_text())
    out, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    failure = "RankFailure: process 0 of 2 failed in a collective call while backward on micro-batch 1 of 2 at step 2"
    assert failure in out, out[-8000:]
    record = re.search(r"process 1: computing the loss on micro-batch 1 of 2 at step 2(.*) \((\d+) s ago\)", out)
    assert record, out[-4000:]
    assert int(record.group(2)) < 60, out[-4000:]  # reported when process 1 died, not after ddp_timeout
    if die_by == "raise":
        assert record.group(1) == ", raised RuntimeError: planted failure in the loss", out[-4000:]
        assert "Process 1 stopped on an error of its own (above); its traceback is in its log." in out, out[-4000:]
        # process 1's own traceback names it and what it was doing
        assert "(process 1 of 2 raised this while computing the loss on micro-batch 1 of 2 at step 2)" in out
    else:
        assert record.group(1) == "", out[-4000:]
        assert "Process 1 died: its connection closed without an error of its own" in out, out[-4000:]


def test_lora_fsdp2_two_processes_equal_one_and_resume(tmp_path, tiny_model_dir, toy_module):
    """LoRA (peft) adapters on the FSDP2-sharded policy: frozen base and trainable adapters share each layer's
    shard group. Two processes give the same losses, gradient norms and adapter weights as one, within the module's
    1e-5 (measured: losses and grad norms 2e-7 relative, adapters 1.3e-7 absolute), and a sharded checkpoint of
    the adapters resumes to the uninterrupted run. lora_dropout 0: dropout masks are drawn per process, so they
    differ between 1 and 2 processes by design; lr 1e-2 moves the adapters (B starts at 0) far beyond rounding."""
    pytest.importorskip("peft")
    dataset = write_rows(tmp_path / "rows.jsonl", TOY_ROWS)
    lora = {"use_peft": True, "lora_r": 4, "lora_dropout": 0.0, "learning_rate": 1e-2}
    source = Path(toy_module.__file__).read_text()
    two = launch(tmp_path, "two", "toy", dataset, toy_fields(tiny_model_dir, tmp_path / "two", 2, **lora), source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train_here(toy_module, toy_fields(tiny_model_dir, tmp_path / "one", 4, **lora)).log_history
    finish(two)
    two_history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert column(two_history, "loss") == pytest.approx(column(one, "loss"), rel=1e-5)
    assert column(two_history, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5)
    a, b = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("one", "two"))
    assert len(a) == 28 and max_diff(a, b) < 1e-5  # 2 layers x 7 linear modules x (A, B)
    assert min(t.abs().max().item() for k, t in b.items() if "lora_B" in k) > 1e-3  # every adapter trained
    assert (tmp_path / "two" / "checkpoint-2" / "sharded" / ".metadata").is_file()

    shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    fields = toy_fields(tiny_model_dir, tmp_path / "part", 2, resume_from_checkpoint="latest", **lora)
    finish(launch(tmp_path, "part", "toy", dataset, fields, source))
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert column(part, "loss") == pytest.approx(column(two_history, "loss")[2:], rel=1e-5)
    resumed = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert max_diff(resumed, b) < 1e-5
