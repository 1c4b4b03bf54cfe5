"""The shipped accelerate configs parse and say what their names promise; --accelerate_config builds the
launch command; launcher settings the loop cannot honour are refused with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from posttrain import ConfigError
from posttrain.cli import train as cli_train

LAUNCH = Path(cli_train.__file__).resolve().parent.parent / "configs" / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))


def test_the_expected_configs_are_shipped():
    assert sorted(p.stem for p in CONFIGS) == [
        "ddp",
        "ddp-2nodes",
        "deepspeed-zero2",
        "deepspeed-zero2-2nodes",
        "deepspeed-zero3",
        "deepspeed-zero3-2nodes",
        "fsdp2",
        "fsdp2-2nodes",
    ]
    assert cli_train.shipped_launch_configs() == sorted(p.stem for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    text = path.read_text()
    assert text.startswith("#") and "posttrain train" in text  # opens with the command that uses it
    assert config.mixed_precision == "no"  # precision is posttrain's (--bf16), checked by make_accelerator
    two = path.stem.endswith("-2nodes")
    assert config.num_machines == (2 if two else 1)
    assert config.num_processes == (16 if two else 8)
    if two:
        assert config.main_process_ip and config.main_process_port == 29500
    if path.stem.startswith("fsdp2"):
        assert config.distributed_type.value == "FSDP"
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    elif path.stem.startswith("deepspeed"):
        assert config.distributed_type.value == "DEEPSPEED"
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(path.stem.split("-")[1].removeprefix("zero"))
        assert ds["zero3_init_flag"] is False  # the loop loads models whole; prepare() partitions them
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert ds.get("zero3_save_16bit_model", ds["zero_stage"] == 2) is True  # ZeRO-3: final model gathered
        assert (ds.get("deepspeed_multinode_launcher") == "standard") == two  # torchrun per node, not pdsh
    else:
        assert config.distributed_type.value == "MULTI_GPU"


def test_the_slurm_script_is_valid_bash_and_uses_a_shipped_config():
    script = LAUNCH / "slurm-2nodes.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "CONFIG=${ACCELERATE_CONFIG:-fsdp2-2nodes}" in text
    assert "--machine_rank \\$SLURM_NODEID" in text and "-m posttrain train" in text


def test_accelerate_config_relaunches_under_accelerate(monkeypatch, capsys):
    called = {}
    monkeypatch.setattr(subprocess, "call", lambda command: called.setdefault("command", command) and 0)
    argv = ["--model", "m", "--accelerate_config", "fsdp2", "--num_processes=2", "--bf16", "true"]
    assert cli_train.run("train", ["sft", *argv]) == 0
    assert called["command"] == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / "fsdp2.yaml"),
        "--num_processes",
        "2",
        "-m",
        "posttrain",
        "train",
        "sft",
        "--model",
        "m",
        "--bf16",
        "true",
    ]
    assert "launching: -m accelerate.commands.launch" in capsys.readouterr().err


def test_accelerate_config_takes_a_file(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert cli_train.resolve_launch_config(str(own)) == own
    assert cli_train.resolve_launch_config("ddp-2nodes.yaml") == LAUNCH / "ddp-2nodes.yaml"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--accelerate_config", "zero9"], "no such file, and not a shipped config"),
        (["--accelerate_config"], "--accelerate_config needs a value"),
        (["--num_processes", "2"], "--num_processes configure the launcher: pass them with --accelerate_config"),
    ],
)
def test_bad_launch_arguments_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli_train.run("train", ["sft", *argv])


def test_help_lists_the_shipped_configs(capsys):
    assert cli_train.run("train", ["--help"]) == 0
    assert "--accelerate_config" in capsys.readouterr().out


def _config(**fields):
    from posttrain.config import TrainingConfig

    return TrainingConfig(**fields)


@pytest.mark.parametrize(
    ("env", "mixed", "message"),
    [
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "no", "sets mixed_precision: bf16, but this run's config says"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "no", "selects FSDP version 1 on CPU"),
    ],
)
def test_launcher_settings_the_loop_cannot_honour_are_refused(monkeypatch, env, mixed, message):
    from posttrain import _distributed

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        _distributed.make_accelerator(_config(), mixed, cpu=True)


def test_ddp_timeout_must_be_positive():
    from posttrain.config import config_problems

    assert "ddp_timeout must be >= 1 (seconds), got 0" in config_problems(_config(ddp_timeout=0))
