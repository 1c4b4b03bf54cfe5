"""Shared machinery of the bad-input catalogue (imported by every ``test_*.py`` here as ``bad_input_catalogue``).

Every case runs the real command line (``posttrain.cli.main``, in-process; a subprocess where a signal is
involved) and checks four things:

1. the exit code: 2 for a user error (one message, no traceback), 1 for ``check-data``/``doctor``/``list
   --check`` findings, 0 when the input is handled with a warning, 130/143 after SIGINT/SIGTERM;
2. the message names the offending thing (file, row, field, key, plugin, checkpoint, directory) and why;
3. the message says how to fix it;
4. nothing was damaged: every file in the workspace is byte-identical afterwards, and a refused run writes
   nothing at all (:func:`run_case` compares snapshots).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.cli import main


@dataclass
class Outcome:
    code: int
    out: str
    err: str  # stderr plus every warning raised, one per line


def cli(*args) -> Outcome:
    """``posttrain ARGS`` in this process; an unexpected exception (a traceback for the user) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        code = main([str(a) for a in args])
    shown = err.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(code, out.getvalue(), shown)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, plus every directory (so a new empty one shows up too)."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def assert_said(outcome: Outcome, code: int, names: list[str], fix: list[str], stream: str = "err") -> None:
    text = outcome.err if stream == "err" else outcome.out + outcome.err
    where = f"exit {outcome.code}; stdout:\n{outcome.out}\nstderr:\n{outcome.err}"
    assert outcome.code == code, where
    assert "Traceback" not in outcome.err and "Traceback" not in outcome.out, where
    for piece in names + fix:
        assert piece in text, f"{piece!r} missing from the message; {where}"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DROP = object()


def edit(rows: list[dict], k: int, **changes) -> list[dict]:
    """``rows`` with row ``k`` changed (``DROP`` removes a key)."""
    rows = [dict(r) for r in rows]
    for key, value in changes.items():
        if value is DROP:
            del rows[k][key]
        else:
            rows[k][key] = value
    return rows


LM = [{"text": f"hello world {i}"} for i in range(8)]
PAIRS = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(8)]
PROMPT_COMPLETION = [{"prompt": f"Q{i}:", "completion": " A"} for i in range(8)]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]} for _ in range(8)]
UNPAIRED = [{"prompt": f"Q{i}:", "completion": " A", "label": i % 2 == 0} for i in range(8)]
PROMPTS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]


def base_args(paths: dict) -> list[str]:
    """A valid two-step run; a case's own flags come after these and override them."""
    return [
        "--model",
        paths["model"],
        "--output_dir",
        f"{paths['tmp']}/out",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--disable_progress_bar",
    ]


@dataclass
class Case:
    """``posttrain ARGV`` with ``files`` written and ``env`` set first; must exit ``code`` with every string of
    ``names`` (what / where / why) and ``fix`` (how to fix it) in the message.

    ``argv`` is formatted with the paths (``{tmp}``, ``{model}``, ...); the word ``{base}`` expands to
    :func:`base_args`. ``stream="out"`` looks for the strings in stdout too (check-data, list, doctor).
    """

    id: str
    argv: list[str]
    code: int
    names: list[str]
    fix: list[str]
    files: dict[str, object] = field(default_factory=dict)  # path -> text, rows, bytes or callable(path, paths)
    env: dict[str, str] = field(default_factory=dict)
    stream: str = "err"
    site: list[dict] = field(default_factory=list)  # fake distributions to install first (FakeSite.add kwargs)
    modifies: str | None = None  # a run that starts (then continues, or fails while training) may write here


def train(method: str, *flags: str) -> list[str]:
    return ["train", method, "{base}", *flags]


def write_files(files: dict, paths: dict) -> None:
    for name, content in files.items():
        path = paths["tmp"] / name.format(**paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path, paths)
        elif isinstance(content, list):
            path.write_text(jsonl(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def expand(argv: list[str], paths: dict) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if arg == "{base}":
            out += [str(a) for a in base_args(paths)]
        else:
            out.append(str(arg).format(**paths))
    return out


def run_case(case: Case, paths: dict, monkeypatch, watched: tuple[Path, ...], site=None) -> Outcome:
    """Run one table case and check its four promises."""
    for dist in case.site:
        site.add(**dist)
    write_files(case.files, paths)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(**paths))
    before = snapshot(*watched)
    outcome = cli(*expand(case.argv, paths))
    names = [n.format(**paths) for n in case.names]
    assert_said(outcome, case.code, names, [f.format(**paths) for f in case.fix], case.stream)
    after = snapshot(*watched)
    free = str(paths["tmp"] / case.modifies) if case.modifies else None
    if free:  # a run that started (and continued or failed in training) may write its own directory
        before, after = (
            {k: v for k, v in d.items() if not (k == free or k.startswith(free + "/"))} for d in (before, after)
        )
    if case.code == 0:  # handled: it may write its run, but changes nothing that was there
        assert {k: v for k, v in after.items() if k in before} == before, "a handled case changed existing files"
    else:
        assert after == before, "a refused run changed or wrote files"
    return outcome


def copy_run(dest: Path, run: Path, damage=None) -> None:
    import shutil

    shutil.copytree(run, dest)
    if damage:
        damage(dest)


def run_copy(damage=None):
    return lambda dest, paths: copy_run(dest, paths["finished"], damage)


def weights_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights_of(a), weights_of(b)
    return wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max().item() <= 1e-6 for k in wa)


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "POSTTRAIN_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1", **extra}


#: Test hooks appended to the toy method: a pause per loss call, so a signal lands mid-run.
SLOW_TOY = """
import os as _os
import time as _time

_DELAY = float(_os.environ.get("TOY_STEP_DELAY", "0"))
_plain_loss = Toy.loss


def _slow_loss(self, model, batch, ctx):
    _time.sleep(_DELAY)
    return _plain_loss(self, model, batch, ctx)


Toy.loss = _slow_loss
"""
