"""The shared loop's invariants: accumulation, padding, resume, crash safety, NaN, interrupts, logging."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from posttrain._errors import PosttrainError
from posttrain.loop import NonFiniteLossError
from safetensors.torch import load_file


def weights(path):
    return load_file(str(path / "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(result):
    return [r["loss"] for r in result.log_history if "loss" in r]


def test_accumulation_equivalence_with_uneven_lengths(runner, toy_rows):
    """batch 8 x acc 1 == batch 1 x acc 8 == batch 2 x acc 4 (loss per step and weights after 3 steps).

    Rows have 1-7 repetitions, so a per-micro-batch mean would weight tokens differently; the
    sum/count contract makes every arrangement compute d(sum of token losses)/N exactly.
    """
    lengths = {len(r["text"]) for r in toy_rows[:8]}
    assert len(lengths) > 3
    runs = {
        (b, a): runner.train(
            toy_rows, f"ga-{b}-{a}", max_steps=3, per_device_train_batch_size=b, gradient_accumulation_steps=a
        )
        for b, a in ((8, 1), (1, 8), (2, 4))
    }
    ref = losses(runs[(8, 1)])
    for key, result in runs.items():
        assert losses(result) == pytest.approx(ref, rel=1e-5), key
        assert max_diff(weights(runner.tmp / "ga-8-1"), weights(runner.tmp / f"ga-{key[0]}-{key[1]}")) < 1e-5


def test_mean_loss_would_break_accumulation(runner, toy_rows, toy_module, monkeypatch):
    """The same check catches a method that returns a per-micro-batch mean (the classic bug)."""
    original = toy_module.Toy.loss

    def mean_loss(self, model, batch, ctx):
        out = original(self, model, batch, ctx)
        return type(out)(out.loss_sum / out.n_items, 1, out.metrics)

    monkeypatch.setattr(toy_module.Toy, "loss", mean_loss)
    a = runner.train(toy_rows, "mean-8", max_steps=2, per_device_train_batch_size=8)
    b = runner.train(toy_rows, "mean-1", max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    assert max_diff(weights(runner.tmp / "mean-8"), weights(runner.tmp / "mean-1")) > 1e-5
    assert a.global_step == b.global_step == 2


def test_padding_invariance(runner, toy_rows, toy_module, tiny_model_dir):
    from posttrain.testing.kit import check_padding_invariance

    check_padding_invariance(toy_module.Toy, toy_rows, tiny_model_dir, {})


def test_extra_padding_does_not_change_training(runner, toy_rows, toy_module, monkeypatch):
    """Padding every batch to 64 columns gives the same losses and weights as padding to the longest row."""
    base = runner.train(toy_rows, "pad-none", max_steps=2)
    original = toy_module.Toy.collate

    def padded(self, rows, ctx):
        batch = original(self, rows, ctx)
        extra = 64 - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=ctx.tokenizer.pad_token_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
        return batch

    monkeypatch.setattr(toy_module.Toy, "collate", padded)
    wide = runner.train(toy_rows, "pad-wide", max_steps=2)
    assert losses(wide) == pytest.approx(losses(base), rel=1e-5)
    assert max_diff(weights(runner.tmp / "pad-none"), weights(runner.tmp / "pad-wide")) < 1e-5


def test_resume_equals_uninterrupted(runner, toy_rows):
    full = runner.train(toy_rows, "full", max_steps=6, save_steps=3)
    shutil.copytree(runner.tmp / "full" / "checkpoint-3", runner.tmp / "part" / "checkpoint-3")
    resumed = runner.train(toy_rows, "part", max_steps=6, save_steps=3, resume_from_checkpoint="latest")
    assert losses(resumed) == losses(full)[3:]
    assert max_diff(weights(runner.tmp / "full"), weights(runner.tmp / "part")) == 0.0
    rows = [json.loads(x) for x in (runner.tmp / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5, 6]


def test_crash_during_checkpoint_write_keeps_last_good_one(runner, toy_rows, monkeypatch):
    """A failure while writing checkpoint-4 leaves checkpoint-2 intact and no partial checkpoint-4."""
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        runner.train(toy_rows, "crash", max_steps=6, save_steps=2)
    monkeypatch.setattr(torch, "save", real_save)
    out = runner.tmp / "crash"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    resumed = runner.train(toy_rows, "crash", max_steps=6, save_steps=2, resume_from_checkpoint="latest")
    full = runner.train(toy_rows, "nocrash", max_steps=6, save_steps=2)
    assert losses(resumed) == losses(full)[2:]
    assert max_diff(weights(out), weights(runner.tmp / "nocrash")) == 0.0


def test_resume_from_partial_checkpoint_is_refused(runner, toy_rows):
    runner.train(toy_rows, "partial", max_steps=3, save_steps=1)
    os.remove(runner.tmp / "partial" / "checkpoint-2" / "trainer_state.json")
    with pytest.raises(PosttrainError, match="incomplete or corrupt.*checkpoint-1"):
        runner.train(
            toy_rows,
            "partial",
            max_steps=4,
            resume_override=["max_steps"],
            resume_from_checkpoint=str(runner.tmp / "partial" / "checkpoint-2"),
        )
    (runner.tmp / "partial" / "checkpoint-1" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(PosttrainError, match="optimizer.pt is not a plain file of tensors and data"):
        runner.train(toy_rows, "partial", max_steps=4, resume_override=["max_steps"], resume_from_checkpoint="latest")


def test_nan_loss_stops_with_step_and_rows(runner, toy_rows):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*rows of the batch") as info:
        runner.train(toy_rows, "nan", max_steps=5, save_steps=2, nan_at_step=2)
    assert "last good checkpoint" in str(info.value) and "checkpoint-2, is kept" in str(info.value)
    assert (runner.tmp / "nan" / "checkpoint-2" / "trainer_state.json").is_file()


def test_output_dir_with_another_run_is_refused(runner, toy_rows):
    runner.train(toy_rows, "taken", max_steps=1)
    with pytest.raises(PosttrainError, match="already holds a finished run.*--overwrite_output_dir"):
        runner.train(toy_rows, "taken", max_steps=1)
    runner.train(toy_rows, "taken", max_steps=1, overwrite_output_dir=True)


def test_dataset_smaller_than_one_step(runner, toy_rows):
    with pytest.raises(PosttrainError, match="one optimizer step needs 32"):
        runner.train(toy_rows[:10], "small", per_device_train_batch_size=8, gradient_accumulation_steps=4)


def test_sigint_saves_resumable_checkpoint(runner, toy_rows, toy_module):
    from posttrain.loop import train

    class InterruptAtStep2:
        def on_log(self, ctx, metrics):
            if metrics["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)

    config = runner.config("sigint", max_steps=6)
    result = train(toy_module.Toy(), config, train_dataset=toy_rows, callbacks=[InterruptAtStep2()])
    assert result.interrupted and result.global_step == 2
    assert (runner.tmp / "sigint" / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = runner.train(toy_rows, "sigint", max_steps=6, resume_from_checkpoint="latest")
    full = runner.train(toy_rows, "sigint-full", max_steps=6)
    assert losses(resumed) == losses(full)[2:]


def test_metrics_eval_rotation_and_final_model(runner, toy_rows):
    from transformers import AutoModelForCausalLM

    result = runner.train(
        toy_rows,
        "full-run",
        max_steps=6,
        save_steps=2,
        save_total_limit=1,
        eval_steps=3,
        eval_dataset=toy_rows[:6],
        logging_steps=2,
        warmup_steps=2,
    )
    out = runner.tmp / "full-run"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert "eval_num_tokens" in eval_rows[0]
    assert train_rows[0]["learning_rate"] == pytest.approx(1e-3)  # warmup done after 2 steps
    assert train_rows[1]["learning_rate"] < train_rows[0]["learning_rate"]  # linear decay
    model = AutoModelForCausalLM.from_pretrained(out)
    assert max_diff(model.state_dict(), weights(out)) == 0.0
    assert result.final_loss == train_rows[-1]["loss"]


def test_checkpoint_loads_with_transformers(runner, toy_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner.train(toy_rows, "ckpt", max_steps=2, save_steps=1)
    AutoModelForCausalLM.from_pretrained(runner.tmp / "ckpt" / "checkpoint-1")
    AutoTokenizer.from_pretrained(runner.tmp / "ckpt" / "checkpoint-1")


def test_tensorboard_logging(runner, toy_rows):
    pytest.importorskip("tensorboard")
    runner.train(toy_rows, "tb", max_steps=2, report_to=["tensorboard"])
    assert list((runner.tmp / "tb" / "runs").glob("events.out.tfevents.*"))


def test_lora_trains_adapters_only(runner, toy_rows):
    pytest.importorskip("peft")
    runner.train(toy_rows, "lora", max_steps=2, use_peft=True, lora_r=4)
    out = runner.tmp / "lora"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    runner.train(toy_rows, "lora-resume", max_steps=4, save_steps=2, use_peft=True, lora_r=4)
    shutil.copytree(runner.tmp / "lora-resume" / "checkpoint-2", runner.tmp / "lora-part" / "checkpoint-2")
    runner.train(
        toy_rows, "lora-part", max_steps=4, save_steps=2, use_peft=True, lora_r=4, resume_from_checkpoint="latest"
    )
    a = load_file(str(runner.tmp / "lora-resume" / "adapter_model.safetensors"))
    b = load_file(str(runner.tmp / "lora-part" / "adapter_model.safetensors"))
    assert max_diff(a, b) == 0.0


def test_metric_kinds_and_totals_survive_a_resume_between_logs(runner, toy_rows, toy_module, monkeypatch):
    """Metric.total keeps a running sum over the run, saved with checkpoints including values reported since the
    last log (save_steps 3 is not a multiple of logging_steps 2); sum/max/ratio reduce over the window."""
    from posttrain import Metric

    original = toy_module.Toy.loss

    def with_kinds(self, model, batch, ctx):
        out = original(self, model, batch, ctx)
        n = out.n_items.float()
        out.metrics = {
            "tokens_total": Metric.total(n),
            "tokens_window": Metric.sum(n),
            "tokens_max": Metric.max(n),
            "half": Metric.ratio(n, 2 * n),
        }
        return out

    monkeypatch.setattr(toy_module.Toy, "loss", with_kinds)
    full = runner.train(toy_rows, "kinds-full", max_steps=6, save_steps=3, logging_steps=2)
    logged = [r for r in full.log_history if "loss" in r]
    assert [r["half"] for r in logged] == [0.5, 0.5, 0.5]
    assert logged[-1]["tokens_total"] == pytest.approx(sum(r["tokens_window"] for r in logged))
    assert all(r["tokens_max"] <= r["tokens_window"] for r in logged)
    shutil.copytree(runner.tmp / "kinds-full" / "checkpoint-3", runner.tmp / "kinds-part" / "checkpoint-3")
    resumed = runner.train(
        toy_rows, "kinds-part", max_steps=6, save_steps=3, logging_steps=2, resume_from_checkpoint="latest"
    )
    again = [r for r in resumed.log_history if "loss" in r]
    assert again[-1]["tokens_total"] == logged[-1]["tokens_total"]  # exact: step 3's tokens were saved
