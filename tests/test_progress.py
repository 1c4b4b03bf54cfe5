"""Training progress: a live bar on a terminal, one line per logged step anywhere else."""

from __future__ import annotations

import io
import re

from posttrain._tracking import ProgressBar, _duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(
    r"^sft: step +(\d+)/10 \( *(\d+)%\)  loss (\d+\.\d{4})  lr (\S+)  (\d+\.\d\d) steps/s  ETA (\S+)$", re.M
)


def test_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(10, 0, "sft", stream=out)
    assert not bar.live
    bar.update(1)  # not a logged step: nothing
    bar.update(5, {"loss": 1.23456, "learning_rate": 1e-3, "step": 5})
    bar.update(10, {"loss": 0.5, "learning_rate": 0.0, "step": 10})
    bar.close()
    rows = LINE.findall(out.getvalue())
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("5", "50", "1.2346", "1.00e-03"),
        ("10", "100", "0.5000", "0.00e+00"),
    ]
    assert rows[1][5] == "0s"  # nothing left
    assert out.getvalue().count("\n") == 2


def test_live_bar_on_a_terminal():
    term = Terminal()
    bar = ProgressBar(10, 0, "sft", stream=term)
    assert bar.live
    for step in range(1, 11):
        bar.update(step, {"loss": 0.25, "learning_rate": 1e-3} if step % 5 == 0 else None)
    bar.close()
    text = term.getvalue()
    assert "10/10" in text and "loss 0.2500" in text
    assert "\x1b[" in text  # terminal control codes: a live display, not log lines
    assert not LINE.search(text)


def test_disabled_is_silent():
    for stream in (io.StringIO(), Terminal()):
        bar = ProgressBar(10, 0, "sft", enabled=False, stream=stream)
        bar.update(5, {"loss": 1.0})
        bar.close()
        assert stream.getvalue() == ""


def test_duration_format():
    assert [_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h02m"]


def test_a_training_run_logs_lines_to_stderr(runner, toy_rows, capsys):
    """The loop's progress, with stderr captured (not a terminal): one line per logging_steps."""
    runner.train(toy_rows, "progress", max_steps=6, logging_steps=2, disable_progress_bar=False)
    err = capsys.readouterr().err
    steps = re.findall(r"^toy: step (\d)/6 .* loss \d+\.\d{4} .* steps/s  ETA \S+$", err, re.M)
    assert steps == ["2", "4", "6"], err
