"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo) equal one process for SFT, DPO and GRPO; DeepSpeed
checkpoints resume exactly and are checked to be plain data before DeepSpeed unpickles them; what the loop cannot
run under DeepSpeed is refused with the reason.

ZeRO-2 runs through the shipped ``configs/launch/deepspeed-zero2.yaml``. ZeRO-3 runs through the shipped
``deepspeed-zero3.yaml`` with one change, made here as a ``deepspeed_config_file``: DeepSpeed keeps parameters
under ``stage3_param_persistence_threshold`` (1e5 elements) whole on every process, which is every parameter of
the tiny test model, so the threshold is 0 and every parameter is really partitioned (each forward gathers it).

Tolerances as in test_fsdp.py: the engine averages each gradient over the two processes where one process sums
the whole batch, so float32 sums are added in a different order (measured: losses and gradient norms within
3.4e-7 relative, weights within 2.6e-7 for SFT and GRPO and 1.2e-6 for DPO). 1e-5 leaves at least 8x and
still fails on a wrong normalisation: clipping is active (gradient norms 2.9-3.3 against max_grad_norm 1), so a
wrong scale changes the update, and ``grad_norm`` is compared too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("deepspeed")


def _fsdp_test_helpers():
    """test_fsdp.py's launch helpers and data (the suite imports test modules by path: --import-mode=importlib)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_posttrain_fsdp_tests", Path(__file__).with_name("test_fsdp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fsdp = _fsdp_test_helpers()
DPO_ROWS, LAUNCH, SCRIPT, TOY_ROWS = _fsdp.DPO_ROWS, _fsdp.LAUNCH, _fsdp.SCRIPT, _fsdp.TOY_ROWS
column, dpo_args, env, finish, free_port = _fsdp.column, _fsdp.dpo_args, _fsdp.env, _fsdp.finish, _fsdp.free_port
history_of, max_diff, toy_fields, train_here = _fsdp.history_of, _fsdp.max_diff, _fsdp.toy_fields, _fsdp.train_here
weights, write_rows = _fsdp.weights, _fsdp.write_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("fsdp")]
STAGES = (2, 3)


def launch_config(tmp: Path, stage: int) -> Path:
    """The shipped config for ``stage`` (ZeRO-3: every parameter partitioned, module docstring)."""
    shipped = LAUNCH / f"deepspeed-zero{stage}.yaml"
    if stage == 2:
        return shipped
    ds = tmp / "zero3.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 0,
                    "stage3_gather_16bit_weights_on_model_save": True,
                },
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    # accelerate refuses inline DeepSpeed settings (and mixed_precision) beside a deepspeed_config_file
    lines = [line for line in shipped.read_text().splitlines() if not line.startswith("#")]
    keep = [line for line in lines if not line.startswith("  ") and not line.startswith("mixed_precision")]
    keep.insert(keep.index("deepspeed_config:") + 1, f"  deepspeed_config_file: {ds}\n  zero3_init_flag: false")
    path = tmp / "zero3.yaml"
    path.write_text("\n".join(keep) + "\n")
    return path


def launch(tmp: Path, name: str, stage: int, method: str, dataset: Path, fields: dict, toy_source: str):
    """``accelerate launch --config_file <stage's config> --num_processes 2 run.py spec.json`` (not waited for)."""
    (tmp / "posttrain_toy_method.py").write_text(toy_source)
    (tmp / "run.py").write_text(SCRIPT)
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"method": method, "toy_dir": str(tmp), "dataset": str(dataset), "fields": fields}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config(tmp, stage))]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), str(tmp / "run.py"), str(spec)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, tiny_model_dir, toy_module):
    """The toy method (SFT) for 4 steps with checkpoint-2 under ZeRO-2 and ZeRO-3 (2 processes, batch 2 each),
    and meanwhile 1 process (batch 4) here."""
    tmp = tmp_path_factory.mktemp("deepspeed-toy")
    source = Path(toy_module.__file__).read_text()
    dataset = write_rows(tmp / "rows.jsonl", TOY_ROWS)
    runs = {}
    for stage in STAGES:
        (tmp / f"z{stage}").mkdir()
        fields = toy_fields(tiny_model_dir, tmp / f"z{stage}" / "out", 2)
        runs[stage] = launch(tmp / f"z{stage}", "run", stage, "toy", dataset, fields, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train_here(toy_module, toy_fields(tiny_model_dir, tmp / "one", 4)).log_history
    histories = {}
    for stage, process in runs.items():
        finish(process)
        histories[stage] = json.loads((tmp / f"z{stage}" / "out" / "history.json").read_text())
    return tmp, one, histories, source


@pytest.mark.parametrize("stage", STAGES)
def test_zero_two_processes_equal_one(toy_runs, stage):
    tmp, one, histories, _ = toy_runs
    two = histories[stage]
    assert min(column(one, "grad_norm")) > 2  # clipped at 1: the normalisation decides the update
    assert column(two, "loss") == pytest.approx(column(one, "loss"), rel=1e-5)
    assert column(two, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5)
    assert max_diff(weights(tmp / "one"), weights(tmp / f"z{stage}" / "out")) < 1e-5


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_is_atomic_and_the_final_model_consolidated(toy_runs, stage):
    tmp, *_ = toy_runs
    out = tmp / f"z{stage}" / "out"
    state = out / "checkpoint-2" / "deepspeed" / "state"
    optimizer_files = sorted(p.name for p in state.glob("*optim_states.pt"))
    assert optimizer_files == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # one per process
    assert not (out / "checkpoint-2" / "model.safetensors").exists()
    assert {"config.json", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.json"} <= {
        p.name for p in (out / "checkpoint-2").iterdir()
    }
    assert not list(out.glob(".tmp-*"))  # written into a temporary directory and renamed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # one ordinary save_pretrained directory, float32
    assert {p.dtype for p in model.parameters()} == {__import__("torch").float32}
    assert (out / "run_complete.json").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_resumes_exactly(toy_runs, tiny_model_dir, stage):
    tmp, _, histories, source = toy_runs
    part = tmp / f"z{stage}" / "resumed"
    shutil.copytree(tmp / f"z{stage}" / "out" / "checkpoint-2", part / "checkpoint-2")
    fields = toy_fields(tiny_model_dir, part, 2, resume_from_checkpoint="latest")
    finish(launch(tmp / f"z{stage}", "resumed", stage, "toy", tmp / "rows.jsonl", fields, source))
    resumed = json.loads((part / "history.json").read_text())
    # the same processes, partitions and reduction order as the uninterrupted run: equal to the last bit here
    assert column(resumed, "loss") == pytest.approx(column(histories[stage], "loss")[2:], rel=1e-6)
    assert column(resumed, "grad_norm") == pytest.approx(column(histories[stage], "grad_norm")[2:], rel=1e-6)
    assert max_diff(weights(tmp / f"z{stage}" / "out"), weights(part)) < 1e-6


def test_a_step_without_loss_items_is_skipped_as_in_one_process(tmp_path, tiny_model_dir, toy_module):
    """Step 2 has no loss items on any process (as when every completion is truncated): one process skips the
    update; under DeepSpeed the engine's step is skipped and the (zero) gradients left in its buffers add nothing
    to step 3's, so the losses and weights stay equal to one process's."""
    source = Path(toy_module.__file__).read_text()
    dataset = write_rows(tmp_path / "rows.jsonl", TOY_ROWS)
    processes = {}
    for stage in STAGES:
        (tmp_path / f"c{stage}").mkdir()
        fields = toy_fields(tiny_model_dir, tmp_path / f"z{stage}", 2, empty_at_step=1, save_steps=0)
        processes[stage] = launch(tmp_path / f"c{stage}", "empty", stage, "toy", dataset, fields, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fields = toy_fields(tiny_model_dir, tmp_path / "one", 4, empty_at_step=1, save_steps=0)
        one = train_here(toy_module, fields).log_history
    assert len(column(one, "grad_norm")) == 3  # step 2 made no update
    for stage, process in processes.items():
        out = finish(process)
        assert "step 2: no loss items in the batch" in out, stage
        two = json.loads((tmp_path / f"z{stage}" / "history.json").read_text())
        assert column(two, "loss") == pytest.approx(column(one, "loss"), rel=1e-5, nan_ok=True), stage
        assert column(two, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5), stage
        assert max_diff(weights(tmp_path / "one"), weights(tmp_path / f"z{stage}")) < 1e-5, stage


def test_planted_pickle_in_a_deepspeed_checkpoint_is_refused_before_deepspeed_loads_it(toy_runs, tmp_path):
    """DeepSpeed loads its files with torch.load(weights_only=False): posttrain reads each one with
    weights_only=True first, so a planted payload raises there and DeepSpeed never sees the file."""
    from posttrain import PosttrainError
    from posttrain import _checkpoint as ckpt

    tmp, *_ = toy_runs
    bad = tmp_path / "planted" / "checkpoint-2"
    shutil.copytree(tmp / "z3" / "out" / "checkpoint-2", bad)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = bad / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    import torch

    torch.save({"optimizer_state_dict": Payload()}, target)  # a torch file, as DeepSpeed writes them
    loaded = []
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: loaded.append(a) or (str(bad), {}))
    accelerator = SimpleNamespace(
        distributed_type="DistributedType.DEEPSPEED", num_processes=2, process_index=0, unwrap_model=lambda m: m
    )
    with pytest.raises(PosttrainError, match="is not a plain file of tensors and data"):
        ckpt.load_checkpoint(bad, accelerator=accelerator, model=engine, optimizer=None, scheduler=None)
    assert not marker.exists() and not loaded
    # the untouched checkpoint passes the same check
    ckpt._check_deepspeed_files(tmp / "z3" / "out" / "checkpoint-2" / "deepspeed")
    ckpt._check_deepspeed_files(tmp / "z2" / "out" / "checkpoint-2" / "deepspeed")


@pytest.mark.parametrize(
    ("processes", "under_deepspeed", "message"),
    [
        (2, False, "it was written under DeepSpeed, and this run is not"),
        (3, True, "written by 2 DeepSpeed processes, resumed on 3"),
    ],
)
def test_a_deepspeed_checkpoint_resumes_only_under_deepspeed_on_as_many_processes(
    toy_runs, processes, under_deepspeed, message
):
    from posttrain import PosttrainError
    from posttrain import _checkpoint as ckpt

    tmp, *_ = toy_runs
    kind = "DistributedType.DEEPSPEED" if under_deepspeed else "DistributedType.NO"
    accelerator = SimpleNamespace(
        distributed_type=kind, num_processes=processes, process_index=0, unwrap_model=lambda m: m
    )
    with pytest.raises(PosttrainError, match=message):
        ckpt.load_checkpoint(
            tmp / "z2" / "out" / "checkpoint-2", accelerator=accelerator, model=None, optimizer=None, scheduler=None
        )


def test_dpo_zero2_and_zero3_equal_one_process(tmp_path, tiny_model_dir):
    """DPO with its frozen reference: whole on each process under ZeRO-2, a partitioned DeepSpeed inference
    engine under ZeRO-3. Started with ``posttrain train --accelerate_config FILE`` as a user would."""
    pytest.importorskip("posttrain_dpo")
    from posttrain.cli.train import run

    dataset = write_rows(tmp_path / "pairs.jsonl", DPO_ROWS)
    posttrain = [sys.executable, "-m", "posttrain", "train", "dpo"]
    processes = {}
    for stage in STAGES:
        (tmp_path / f"c{stage}").mkdir()
        config = launch_config(tmp_path / f"c{stage}", stage)
        launcher = ["--accelerate_config", str(config), "--num_processes", "2", "--main_process_port", str(free_port())]
        args = dpo_args(tiny_model_dir, dataset, tmp_path / f"z{stage}", 2)
        processes[stage] = subprocess.Popen(
            [*posttrain, *args, *launcher], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run("train", ["dpo", *dpo_args(tiny_model_dir, dataset, tmp_path / "one", 4)]) == 0
    one = history_of(tmp_path / "one")
    assert column(one, "loss")[0] == pytest.approx(0.6931472, abs=1e-6)  # step 1: policy == reference
    for stage, process in processes.items():
        finish(process)
        other = history_of(tmp_path / f"z{stage}")
        assert column(other, "loss") == pytest.approx(column(one, "loss"), rel=1e-5), stage
        assert column(other, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5), stage
        assert max_diff(weights(tmp_path / "one"), weights(tmp_path / f"z{stage}")) < 1e-5, stage


def test_grpo_zero2_and_zero3_generate_and_train_like_one_process(tmp_path, tiny_model_dir, toy_module):
    """GRPO with HF generation and a KL reference (beta > 0). Under ZeRO-3 the policy's parameters are partitioned:
    every decode step gathers them layer by layer (every process keeps stepping until all are done, transformers'
    synced_gpus), and the reference is a partitioned inference engine. per_prompt_generation seeds each prompt's
    samples, so every run scores the same completions (fixed completions: the rewards are compared first); GRPO's
    loss is a difference of nearly equal terms (about 1e-5 here), so it is compared absolutely at 1e-6."""
    pytest.importorskip("posttrain_grpo")
    from posttrain.config import build_config
    from posttrain.loop import train
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

    source = Path(toy_module.__file__).read_text()
    processes = {}
    for stage in STAGES:
        (tmp_path / f"c{stage}").mkdir()
        out = tmp_path / f"z{stage}"
        processes[stage] = launch(tmp_path / f"c{stage}", "grpo", stage, "grpo", dataset, fields(out, 4), source)

    def digits(prompts, completions, **columns):  # the same reward as the launched script's
        return [sum(c.isdigit() for c in x) / (1 + len(x)) for x in completions]

    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train(
            GRPO(),
            build_config(GRPOConfig, fields(tmp_path / "one", 8)),
            train_dataset=rows,
            rewards={"digits": digits},
        ).log_history
    for stage, process in processes.items():
        finish(process)
        two = json.loads((tmp_path / f"z{stage}" / "history.json").read_text())
        assert column(two, "reward") == pytest.approx(column(one, "reward"), rel=1e-6), stage  # same completions
        assert column(two, "loss") == pytest.approx(column(one, "loss"), abs=1e-6), stage
        assert column(two, "kl") == pytest.approx(column(one, "kl"), rel=1e-4, abs=1e-9), stage
        assert column(two, "grad_norm") == pytest.approx(column(one, "grad_norm"), rel=1e-5), stage
        assert max_diff(weights(tmp_path / "one"), weights(tmp_path / f"z{stage}")) < 1e-5, stage


def _write_json(path: Path, value: dict) -> str:
    path.write_text(json.dumps(value))
    return str(path)


@pytest.mark.parametrize(
    ("launcher", "mixed", "fields", "message"),
    [
        ({}, "fp16", {}, "fp16 under DeepSpeed is not supported"),
        ({}, "no", {"use_peft": True}, r"LoRA \(use_peft: true\) under DeepSpeed is not supported yet"),
        ({"ZERO_STAGE": "1"}, "no", {}, "zero_optimization.stage 1; posttrain supports ZeRO stages 2 and 3"),
        ({"OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "no", {}, "zero_optimization.offload_optimizer.device cpu; offloading"),
        ({"OFFLOAD_PARAM_DEVICE": "nvme", "ZERO_STAGE": "3"}, "no", {}, "offload_param.device nvme; offloading"),
        ({"ZERO_STAGE": "3", "ZERO3_INIT": "true"}, "no", {}, "sets zero3_init_flag: true"),
        (
            {"CONFIG_FILE": {"zero_optimization": {"stage": 3}}},
            "no",
            {},
            "zero3_init_flag: true \\(accelerate's default for a ZeRO-3 deepspeed_config_file\\)",
        ),
        (
            {"CONFIG_FILE": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}},
            "no",
            {},
            "has a 'optimizer' section; posttrain builds the optimizer from its own config",
        ),
        (
            {"CONFIG_FILE": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}},
            "no",
            {},
            "sets bf16.enabled: true, but this run's config says bf16 false",
        ),
        (
            {"CONFIG_FILE": {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}},
            "no",
            {"gradient_accumulation_steps": 2},
            "sets gradient_accumulation_steps: 4, but posttrain's config decides it",
        ),
        (
            {"CONFIG_FILE": {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}},
            "no",
            {"max_grad_norm": 1.0},
            r"sets gradient_clipping: 0.5, but posttrain's config decides it \(max_grad_norm = 1.0\)",
        ),
    ],
)
def test_what_the_loop_cannot_run_under_deepspeed_is_refused_before_any_process_group(
    monkeypatch, tmp_path, launcher, mixed, fields, message
):
    """Checked from the launcher's environment (what ``accelerate launch`` sets for the config file) before the
    Accelerator exists, so each process stops at once with the reason."""
    from posttrain import ConfigError, _distributed
    from posttrain.config import TrainingConfig

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name, value in launcher.items():
        if isinstance(value, dict):
            value = _write_json(tmp_path / "ds.json", value)
        monkeypatch.setenv(f"ACCELERATE_DEEPSPEED_{name}", value)
    with pytest.raises(ConfigError, match=message):
        _distributed.make_accelerator(TrainingConfig(**fields), mixed, cpu=True)
