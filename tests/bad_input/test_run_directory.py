"""Bad input, class "nothing lost": the output directory, the lock, overwriting, finished vs unfinished runs, and
the rules for resuming (docs/failure-modes.md).

Each state of a directory gets one piece of advice wherever it is noticed, so the advice never loops
("resume with latest" -> "no checkpoint, drop --resume" -> "already holds a run" ...).
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
from bad_input_catalogue import LM, PAIRS, Case, cli, jsonl, run_case, run_copy, train

LM_FILE = {"lm.jsonl": LM}
D = ["--dataset", "{tmp}/lm.jsonl"]
RESUME = ["--resume_from_checkpoint", "latest"]
SAME = [*D, "--max_steps", "3", "--save_steps", "1"]  # the finished run's own settings


def unfinished(run):
    (run / "run_complete.json").unlink()
    for name in ("model.safetensors", "config.json"):
        (run / name).unlink()


def unsaved(run):
    unfinished(run)
    for old in run.glob("checkpoint-*"):
        shutil.rmtree(old)


def no_checkpoints(run):
    for old in run.glob("checkpoint-*"):
        shutil.rmtree(old)


def remove_state(run):
    (run / "checkpoint-2" / "trainer_state.json").unlink()


def corrupt_optimizer(run):
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")


def lock(pid, host=None):
    def write(path, paths):
        path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))

    return write


CASES = [
    # -- a new run in a directory that holds one: each state has its own way out
    Case("output-dir-holds-a-finished-run", train("sft", *D), 2,
         ["'{tmp}/out' already holds a finished run (3 steps)"], ["--overwrite_output_dir true", "another --output_dir"],
         {**LM_FILE, "out": run_copy()}),
    Case("output-dir-holds-an-unfinished-run", train("sft", *D), 2,
         ["'{tmp}/out' already holds an unfinished run (newest checkpoint checkpoint-2)"],
         ["--resume_from_checkpoint latest", "--overwrite_output_dir true"], {**LM_FILE, "out": run_copy(unfinished)}),
    Case("output-dir-holds-a-run-stopped-before-its-first-checkpoint", train("sft", *D), 2,
         ["'{tmp}/out' already holds a run that stopped before its first checkpoint", "cannot be resumed"],
         ["--overwrite_output_dir true"], {**LM_FILE, "out": run_copy(unsaved)}),
    # -- resume: where from
    Case("resume-latest-where-nothing-ran", train("sft", *D, *RESUME), 2,
         ["{tmp}/out holds no complete checkpoint (nothing has run there)"], ["Drop --resume_from_checkpoint"],
         LM_FILE),
    Case("resume-latest-of-a-run-stopped-before-its-first-checkpoint", train("sft", *SAME, *RESUME), 2,
         ["{tmp}/out holds no complete checkpoint: the run there stopped before its first save"],
         ["Replace --resume_from_checkpoint latest with --overwrite_output_dir true"],
         {**LM_FILE, "out": run_copy(unsaved)}),
    Case("resume-latest-of-a-finished-run-without-checkpoints", train("sft", *SAME, *RESUME), 2,
         ["the run there finished (3 steps) without intermediate checkpoints"], ["start a new run with --model"],
         {**LM_FILE, "out": run_copy(no_checkpoints)}),
    Case("resume-from-missing-checkpoint", train("sft", *D, "--resume_from_checkpoint", "{tmp}/out/checkpoint-9"), 2,
         ["'{tmp}/out/checkpoint-9' does not exist"], ["pass a checkpoint-* directory, or 'latest'"],
         {**LM_FILE, "out": run_copy()}),
    Case("resume-from-partial-checkpoint", train("sft", *SAME, "--resume_from_checkpoint", "{tmp}/out/checkpoint-2"),
         2, ["'{tmp}/out/checkpoint-2' is incomplete or corrupt (no trainer_state.json)"],
         ["Resume from the newest complete checkpoint there, {tmp}/out/checkpoint-1"],
         {**LM_FILE, "out": run_copy(remove_state)}),
    Case("resume-from-corrupt-checkpoint", train("sft", *SAME, *RESUME), 2,
         ["cannot resume from {tmp}/out/checkpoint-2: optimizer.pt is not a plain file of tensors and data"],
         ["Delete it and resume from an earlier one ({tmp}/out/checkpoint-1)"],
         {**LM_FILE, "out": run_copy(lambda run: (unfinished(run), corrupt_optimizer(run)))}),
    Case("resume-with-overwrite-too", train("sft", *SAME, *RESUME, "--overwrite_output_dir", "true"), 2,
         ["overwrite_output_dir and resume_from_checkpoint are both set"], ["or --overwrite_output_dir true alone"],
         {**LM_FILE, "out": run_copy(unfinished)}),
    # -- resume: with what configuration
    Case("resume-with-another-learning-rate", train("sft", *SAME, *RESUME, "--learning_rate", "0.01"), 2,
         ["resuming {tmp}/out/checkpoint-2 with a configuration that differs", "learning_rate: 0.001 -> 0.01"],
         ["use the saved values", "--resume_override learning_rate to apply the new values from step 2 on"],
         {**LM_FILE, "out": run_copy(unfinished)}),
    Case("resume-with-several-changes-lists-each", train("sft", *SAME, *RESUME, "--seed", "7",
         "--per_device_train_batch_size", "4", "--lr_scheduler_type", "cosine"), 2,
         ["per_device_train_batch_size: 2 -> 4", "seed: 42 -> 7", "lr_scheduler_type: 'linear' -> 'cosine'"],
         ["--resume_override lr_scheduler_type,per_device_train_batch_size,seed"],
         {**LM_FILE, "out": run_copy(unfinished)}),
    Case("resume-with-another-dataset", train("sft", "--dataset", "{tmp}/other.jsonl", "--max_steps", "3",
         "--save_steps", "1", *RESUME), 2, ["dataset: '", "lm.jsonl' -> '{tmp}/other.jsonl'"],
         ["--resume_override dataset"], {"other.jsonl": LM[::-1], "out": run_copy(unfinished)}),
    Case("resume-with-max-steps-at-the-checkpoint", train("sft", *D, "--save_steps", "1", *RESUME,
         "--resume_override", "max_steps"), 2,
         ["the run would end at step 2, but {tmp}/out/checkpoint-2 is at step 2", "nothing left to train"],
         ["raise --max_steps above 2"], {**LM_FILE, "out": run_copy(unfinished)}),
    Case("resume-a-finished-run", train("sft", *SAME, *RESUME), 2,
         ["the run in {tmp}/out finished at step 3", "would overwrite its model"],
         ["raise --max_steps above 3 and add --resume_override max_steps"], {**LM_FILE, "out": run_copy()}),
    Case("resume-with-another-method", train("dpo", "--dataset", "{tmp}/pairs.jsonl", *RESUME), 2,
         ["{tmp}/out/checkpoint-2 was written by a 'sft' run", "cannot be resumed with method 'dpo'"],
         ["`posttrain train sft ...`"], {"pairs.jsonl": PAIRS, "out": run_copy(unfinished)}),
    Case("resume-override-names-no-field", train("sft", *SAME, *RESUME, "--resume_override", "learnin_rate"), 2,
         ["resume_override names ['learnin_rate']", "not a field of SFTConfig"], ["list the fields"],
         {**LM_FILE, "out": run_copy(unfinished)}),
    Case("resume-changing-only-safe-fields", train("sft", *SAME, *RESUME, "--logging_steps", "5",
         "--save_total_limit", "1"), 0, ["done: 3 steps"], [], {**LM_FILE, "out": run_copy(unfinished)},
         modifies="out"),
    # -- the directory itself, checked before any model loads
    Case("output-dir-is-a-file", train("sft", *D, "--output_dir", "{tmp}/taken"), 2,
         ["output_dir '{tmp}/taken' is a file, not a directory"], ["choose another --output_dir"],
         {**LM_FILE, "taken": "I am a file"}),
    Case("output-dir-under-a-file", train("sft", *D, "--output_dir", "{tmp}/taken/run"), 2,
         ["'{tmp}/taken/run' cannot be created: '{tmp}/taken' is a file"], ["Choose another --output_dir"],
         {**LM_FILE, "taken": "I am a file"}),
    Case("output-dir-is-the-model-directory", train("sft", *D, "--output_dir", "{tmp}/mymodel", "--model",
         "{tmp}/mymodel"), 2, ["output_dir '{tmp}/mymodel' is the model directory", "overwrite the model"],
         ["Choose another --output_dir"], {**LM_FILE, "mymodel": lambda dest, p: shutil.copytree(p["model"], dest)}),
    # -- one run per directory
    Case("output-dir-in-use-by-a-live-run", train("sft", *D), 2,
         ["output_dir '{tmp}/out' is in use by another run (PID", "would mix their checkpoints and metrics"],
         ["Wait for it to end", "delete {tmp}/out/.posttrain.lock"], {**LM_FILE, "out/.posttrain.lock": lock(os.getpid())}),
    Case("output-dir-locked-on-another-host", train("sft", *D), 2,
         ["in use by another run (PID 4242 on host gpu-node-7"], ["if that run is dead", "delete {tmp}/out/.posttrain.lock"],
         {**LM_FILE, "out/.posttrain.lock": lock(4242, "gpu-node-7")}),
    Case("stale-lock-of-a-dead-process-is-taken-over", train("sft", *D), 0,
         ["was left by run PID 999999999", "no longer running; taking it over"], [],
         {**LM_FILE, "out/.posttrain.lock": lock(999999999)}, modifies="out"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_run_directory_case(case, paths, watched, monkeypatch):
    run_case(case, paths, monkeypatch, watched)


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("output-dir")], ids=lambda c: c.id)
def test_output_dir_problems_are_found_before_the_model_loads(case, paths, watched, monkeypatch, no_model_load):
    run_case(case, paths, monkeypatch, watched)


def test_output_dir_not_writable(paths, watched, monkeypatch, no_model_load):
    """A read-only parent (simulated: this suite may run as root, for whom chmod changes nothing)."""
    parent = paths["tmp"] / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(parent) else real_access(p, mode))
    (paths["tmp"] / "lm.jsonl").write_text(jsonl(LM))
    case = Case("output-dir-not-writable", train("sft", *D, "--output_dir", "{tmp}/readonly/run"), 2,
                ["'{tmp}/readonly/run' cannot be written: '{tmp}/readonly' is not writable"],
                ["Choose a writable --output_dir or fix the permissions"])  # fmt: skip
    run_case(case, paths, monkeypatch, watched)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_output_dir_under_a_read_only_parent(paths, watched, monkeypatch):
    parent = paths["tmp"] / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (paths["tmp"] / "lm.jsonl").write_text(jsonl(LM))
        case = Case("read-only-parent", train("sft", *D, "--output_dir", "{tmp}/readonly/run"), 2,
                    ["is not writable"], ["fix the permissions"])  # fmt: skip
        run_case(case, paths, monkeypatch, watched)
    finally:
        parent.chmod(0o755)


# -- what the promises mean on disk ----------------------------------------------------------------------------


def base(paths, out="out", *flags):
    return ["train", "sft", "--model", paths["model"], "--dataset", paths["tmp"] / "lm.jsonl", "--output_dir",
            paths["tmp"] / out, "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--disable_progress_bar", *flags]  # fmt: skip


def test_overwrite_deletes_the_old_run_so_latest_cannot_resume_it(paths):
    out = paths["tmp"] / "out"
    shutil.copytree(paths["finished"], out)
    (paths["tmp"] / "lm.jsonl").write_text(jsonl(LM))
    outcome = cli(*base(paths, "out", "--max_steps", "1", "--save_steps", "0", "--overwrite_output_dir", "true"))
    assert outcome.code == 0, outcome.err
    assert "removed the previous run" in outcome.out + outcome.err
    assert not list(out.glob("checkpoint-*")), "the old run's checkpoints survived --overwrite_output_dir"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1], "metrics of the old run were kept"
    again = cli(*base(paths, "out", "--max_steps", "1", "--save_steps", "0", "--resume_from_checkpoint", "latest"))
    assert again.code == 2 and "finished (1 steps) without intermediate checkpoints" in again.err


def test_resume_override_applies_in_full_and_is_recorded(paths):
    """A changed learning rate is applied to the optimizer and the schedule (metrics show it) and saved."""
    out = paths["tmp"] / "out"
    shutil.copytree(paths["finished"], out)
    unfinished(out)
    (paths["tmp"] / "lm.jsonl").write_text(jsonl(LM))
    flags = ["--max_steps", "4", "--save_steps", "1", "--logging_steps", "1", "--resume_from_checkpoint", "latest"]
    outcome = cli(
        *base(paths, "out", *flags, "--learning_rate", "0.01", "--resume_override", "learning_rate,max_steps")
    )
    assert outcome.code == 0, outcome.err
    assert "resuming" in outcome.err and "learning_rate: 0.001 -> 0.01" in outcome.err
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    # linear decay over the new 4 steps, logged after step 3's update: 0.01 * (4 - 3) / 4 (the old 0.001 would
    # give 0.00025: what a half-applied override used to log)
    assert rows[3]["learning_rate"] == pytest.approx(0.0025)
    assert "learning_rate: 0.01" in (out / "posttrain_config.yaml").read_text()


def test_finished_and_interrupted_runs_are_told_apart(paths):
    from posttrain import _run_guard

    assert _run_guard.describe(paths["finished"]).kind == "finished"
    record = json.loads((paths["finished"] / "run_complete.json").read_text())
    assert record["global_step"] == 3 and "model.safetensors" in record["files"]
    for damage, kind in ((unfinished, "resumable"), (unsaved, "unsaved")):
        out = paths["tmp"] / kind
        shutil.copytree(paths["finished"], out)
        damage(out)
        assert _run_guard.describe(out).kind == kind
