"""The bad-input catalogue: what a user gets back for each kind of wrong input.

Every case runs the real command line (``posttrain.cli.main``, in-process; a subprocess where a signal is
involved) and checks four things:

1. the exit code: 2 for a user error (one message, no traceback), 0 when the input is handled with a
   warning, 130 after Ctrl-C;
2. the message names the offending file, row, field, key, plugin or checkpoint;
3. the message says how to fix it;
4. nothing was damaged: every file in the workspace (datasets, configs, earlier runs, checkpoints, models)
   is byte-identical afterwards, and a refused run writes nothing at all.

``CASES`` is the table of the cases that need no more than files and flags; the cases after it need a
plugin, a signal or a failure injected while training. ``docs/operations.md`` summarises the catalogue.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from posttrain.cli import main

# -- running the CLI and checking the workspace ------------------------------------------------------------


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


def assert_said(outcome: Outcome, code: int, names: list[str], fix: list[str]) -> None:
    where = f"exit {outcome.code}; stderr:\n{outcome.err}"
    assert outcome.code == code, where
    assert "Traceback" not in outcome.err, where
    for text in names + fix:
        assert text in outcome.err, f"{text!r} missing from the message; {where}"


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


# -- models that are wrong in one way each (built once) --------------------------------------------------------


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("odd-models")
    bert = root / "bert"  # a transformers model, but an encoder: no causal-LM class for it
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=120)).save_pretrained(
        bert
    )
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bert)
    nopad = root / "nopad"  # EOS but no pad token: handled, padding reuses EOS
    shutil.copytree(tiny_model_dir, nopad)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    noeos = root / "noeos"  # neither: explained
    shutil.copytree(nopad, noeos)
    tok.eos_token = None
    tok.save_pretrained(noeos)
    notemplate = root / "notemplate"  # conversational rows need a chat template
    shutil.copytree(tiny_model_dir, notemplate)
    (notemplate / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((notemplate / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(config))
    return {"bert": bert, "nopad": nopad, "noeos": noeos, "notemplate": notemplate}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """An SFT run of 3 steps with checkpoint-1 and checkpoint-2, for the resume and output_dir cases."""
    root = tmp_path_factory.mktemp("finished")
    (root / "lm.jsonl").write_text(jsonl(LM))
    args = ["train", "sft", *base_args({"model": tiny_model_dir, "tmp": root}), "--dataset", root / "lm.jsonl"]
    outcome = cli(*args, "--max_steps", "3", "--save_steps", "1")
    assert outcome.code == 0, outcome.err
    return root / "out"


def copy_run(dest: Path, run: Path, damage=None) -> None:
    shutil.copytree(run, dest)
    if damage:
        damage(dest)


# -- the table ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``posttrain train METHOD <a valid base run> FLAGS`` with ``files`` written first; must exit ``code``
    with every string of ``names`` (what/where) and ``fix`` (how to fix it) in the message."""

    id: str
    method: str
    flags: list[str]
    code: int
    names: list[str]
    fix: list[str]
    files: dict[str, object] = field(default_factory=dict)  # path -> text, rows, or a callable(path, paths)


def run_copy(damage=None):
    return lambda dest, paths: copy_run(dest, paths["finished"], damage)


def remove_state(run: Path) -> None:
    (run / "checkpoint-2" / "trainer_state.json").unlink()


def corrupt_optimizer(run: Path) -> None:
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")


CASES = [
    # -- dataset files
    Case("dataset-missing", "sft", ["--dataset", "{tmp}/missing.jsonl"], 2,
         ["'{tmp}/missing.jsonl'", "does not exist"], ["Check the path"]),
    Case("dataset-empty", "sft", ["--dataset", "{tmp}/empty.jsonl"], 2,
         ["empty.jsonl", "is empty"], ["needs at least one row"], {"empty.jsonl": ""}),
    Case("dataset-only-blank-lines", "sft", ["--dataset", "{tmp}/blank.jsonl"], 2,
         ["blank.jsonl", "has no rows"], ["one JSON object per line"], {"blank.jsonl": "\n\n  \n"}),
    Case("dataset-invalid-json-line", "sft", ["--dataset", "{tmp}/bad.jsonl"], 2,
         ["bad.jsonl", "line 2 is not valid JSON"], ["fix or remove that line"],
         {"bad.jsonl": '{"text": "a"}\n{"text": "b",}\n'}),
    Case("dataset-not-text", "sft", ["--dataset", "{tmp}/binary.jsonl"], 2,
         ["binary.jsonl", "not UTF-8"], ["save it as UTF-8"], {"binary.jsonl": b"\xff\xfe\x00\x81garbage"}),
    Case("dataset-unknown-suffix", "sft", ["--dataset", "{tmp}/data.txt"], 2,
         ["data.txt", "cannot tell the format"], ["use .json, .jsonl, .csv or .parquet"], {"data.txt": "hello"}),
    Case("dataset-directory-not-saved", "sft", ["--dataset", "{tmp}/folder"], 2,
         ["folder is a directory"], ["save_to_disk"], {"folder/notes.md": "not a dataset"}),
    Case("dataset-too-small-for-one-step", "sft", ["--dataset", "{tmp}/lm.jsonl", "--per_device_train_batch_size", "16"],
         2, ["8 rows", "one optimizer step needs 16"], ["lower them or add data"], {"lm.jsonl": LM}),
    # -- rows
    Case("sft-data-to-dpo", "dpo", ["--dataset", "{tmp}/lm.jsonl"], 2,
         ["lm.jsonl", "columns ['text']", "looks like language_modeling"], ["reads preference: prompt+chosen+rejected"],
         {"lm.jsonl": LM}),
    Case("missing-column-in-row-3", "dpo", ["--dataset", "{tmp}/pairs.jsonl"], 2,
         ["row 3 of {tmp}/pairs.jsonl", "field 'rejected' is missing"],
         ["needs prompt+chosen+rejected", "posttrain check-data dpo {tmp}/pairs.jsonl"],
         {"pairs.jsonl": edit(PAIRS, 3, rejected=DROP)}),
    Case("non-string-field", "dpo", ["--dataset", "{tmp}/pairs.jsonl"], 2,
         ["row 5 of {tmp}/pairs.jsonl", "field 'chosen'", "got int 7"], ["Write it as a JSON string"],
         {"pairs.jsonl": edit(PAIRS, 5, chosen=7)}),
    Case("empty-completion", "sft", ["--dataset", "{tmp}/pc.jsonl"], 2,
         ["row 2 of {tmp}/pc.jsonl", "field 'completion' is empty"], ["Remove the row or fill in the field"],
         {"pc.jsonl": edit(PROMPT_COMPLETION, 2, completion="")}),
    Case("unknown-role", "sft", ["--dataset", "{tmp}/chat.jsonl"], 2,
         ["row 4 of {tmp}/chat.jsonl", "field 'messages'", "unknown role 'human'"],
         ["Use one of: system, user, assistant"],
         {"chat.jsonl": edit(CHAT, 4, messages=[{"role": "human", "content": "hi"}])}),
    Case("message-not-a-mapping", "sft", ["--dataset", "{tmp}/chat.jsonl"], 2,
         ["row 1 of {tmp}/chat.jsonl", "message 0 is not a {{'role', 'content'}} mapping"], ['{{"role": ..., "content"'],
         {"chat.jsonl": edit(CHAT, 1, messages=["hi"])}),
    Case("label-not-boolean", "kto", ["--dataset", "{tmp}/kto.jsonl"], 2,
         ["row 6 of {tmp}/kto.jsonl", "field 'label'", "'yes'"], ["true or false"],
         {"kto.jsonl": edit(UNPAIRED, 6, label="yes")}),
    Case("every-prompt-longer-than-max-length", "dpo", ["--dataset", "{tmp}/long.jsonl", "--max_length", "8"], 2,
         ["{tmp}/long.jsonl", "no usable rows", "dropped 8 of 8 rows"], ["Raise max_length"],
         {"long.jsonl": [{**r, "prompt": "a long prompt " * 3} for r in PAIRS]}),
    Case("conversational-rows-without-chat-template", "sft",
         ["--dataset", "{tmp}/chat.jsonl", "--model", "{notemplate}"], 2,
         ["{tmp}/chat.jsonl", "conversational but the tokenizer has no chat template"], ["set tokenizer.chat_template"],
         {"chat.jsonl": CHAT}),
    # -- configuration
    Case("unknown-key-suggests", "sft", ["--dataset", "{tmp}/lm.jsonl", "--learning_rat", "1e-3"], 2,
         ["unknown key 'learning_rat'"], ["did you mean 'learning_rate'?"], {"lm.jsonl": LM}),
    Case("packing-with-a-method-that-cannot-pack", "dpo", ["--dataset", "{tmp}/pairs.jsonl", "--packing", "true"], 2,
         ["unknown key 'packing' for DPOConfig"], ["remove it", "`posttrain train dpo --help`"],
         {"pairs.jsonl": PAIRS}),
    Case("unknown-key-in-yaml", "sft", ["--config", "{tmp}/run.yaml", "--dataset", "{tmp}/lm.jsonl"], 2,
         ["{tmp}/run.yaml", "unknown key 'max_step'"], ["did you mean 'max_steps'?"],
         {"run.yaml": "max_step: 3\n", "lm.jsonl": LM}),
    Case("wrong-type-flag", "sft", ["--dataset", "{tmp}/lm.jsonl", "--learning_rate", "fast"], 2,
         ["--learning_rate", "'fast'"], ["expected a number"], {"lm.jsonl": LM}),
    Case("wrong-type-in-yaml", "sft", ["--config", "{tmp}/run.yaml", "--dataset", "{tmp}/lm.jsonl"], 2,
         ["{tmp}/run.yaml", "warmup_steps"], ["expected an integer"],
         {"run.yaml": "warmup_steps: [1, 2]\n", "lm.jsonl": LM}),
    Case("choice-misspelt", "sft", ["--dataset", "{tmp}/lm.jsonl", "--lr_scheduler_type", "cosin"], 2,
         ["lr_scheduler_type", "'cosin'"], ["did you mean 'cosine'?"], {"lm.jsonl": LM}),
    Case("negative-batch-size", "sft", ["--dataset", "{tmp}/lm.jsonl", "--per_device_train_batch_size", "-1"], 2,
         ["per_device_train_batch_size", "got -1"], ["must be >= 1"], {"lm.jsonl": LM}),
    Case("zero-max-steps", "sft", ["--dataset", "{tmp}/lm.jsonl", "--max_steps", "0"], 2,
         ["max_steps", "got 0"], ["must be > 0 (or -1 to use num_train_epochs)"], {"lm.jsonl": LM}),
    Case("zero-gradient-accumulation", "sft", ["--dataset", "{tmp}/lm.jsonl", "--gradient_accumulation_steps", "0"],
         2, ["gradient_accumulation_steps", "got 0"], ["must be >= 1"], {"lm.jsonl": LM}),
    Case("bf16-and-fp16", "sft", ["--dataset", "{tmp}/lm.jsonl", "--bf16", "--fp16"], 2,
         ["bf16 and fp16 are both true"], ["choose one"], {"lm.jsonl": LM}),
    Case("packing-without-max-length", "sft",
         ["--dataset", "{tmp}/lm.jsonl", "--packing", "true", "--max_length", "null"], 2,
         ["packing is true but max_length is null"], ["so set it"], {"lm.jsonl": LM}),
    Case("config-file-missing", "sft", ["--config", "{tmp}/nope.yaml"], 2,
         ["'{tmp}/nope.yaml' does not exist"], ["--config"]),
    Case("config-not-a-mapping", "sft", ["--config", "{tmp}/run.yaml"], 2,
         ["{tmp}/run.yaml", "got list"], ["mapping of field: value"], {"run.yaml": "- a\n- b\n"}),
    Case("config-invalid-yaml", "sft", ["--config", "{tmp}/run.yaml"], 2,
         ["{tmp}/run.yaml is not valid YAML", "line 2"], ["expected ',' or ']'"], {"run.yaml": "a: 1\nb: [1, 2\n"}),
    Case("stray-positional-argument", "sft", ["--max_steps", "2", "extra"], 2, ["'extra'"], ["options look like --name value"]),
    # -- model and tokenizer
    Case("model-missing", "sft", ["--dataset", "{tmp}/lm.jsonl", "--model", "{tmp}/nomodel"], 2,
         ["'{tmp}/nomodel' does not exist"], ["a directory saved with save_pretrained"], {"lm.jsonl": LM}),
    Case("model-dir-without-config", "sft", ["--dataset", "{tmp}/lm.jsonl", "--model", "{tmp}/plain"], 2,
         ["'{tmp}/plain' has no config.json"], ["point at the directory that save_pretrained wrote"],
         {"lm.jsonl": LM, "plain/weights.bin": "x"}),
    Case("model-not-a-causal-lm", "sft", ["--dataset", "{tmp}/lm.jsonl", "--model", "{bert}"], 2,
         ["{bert}", "cannot be loaded as AutoModelForCausalLM"], ["a causal language model"], {"lm.jsonl": LM}),
    Case("no-model-given", "sft", ["--dataset", "{tmp}/lm.jsonl", "--model", ""], 2,
         ["no model given"], ["pass --model PATH"], {"lm.jsonl": LM}),
    Case("tokenizer-without-pad-or-eos", "sft", ["--dataset", "{tmp}/lm.jsonl", "--model", "{noeos}"], 2,
         ["'{noeos}' has neither a pad nor an EOS token"], ["add_special_tokens({{'pad_token'"], {"lm.jsonl": LM}),
    # -- methods and rewards
    Case("unknown-method-close", "dpp", ["--dataset", "{tmp}/pairs.jsonl"], 2,
         ["unknown method 'dpp'"], ["Did you mean 'dpo'?"]),
    Case("unknown-method-far", "zzz-method", [], 2,
         ["unknown method 'zzz-method'"], ["pip install posttrain-zzz-method", "`posttrain list`"]),
    Case("unknown-reward", "grpo", ["--dataset", "{tmp}/prompts.jsonl", "--reward_funcs", "acuracy"], 2,
         ["unknown reward 'acuracy'"], ["Did you mean 'accuracy'?"], {"prompts.jsonl": PROMPTS}),
    Case("online-method-without-reward", "grpo", ["--dataset", "{tmp}/prompts.jsonl"], 2,
         ["needs at least one reward function"], ["--reward_funcs accuracy"], {"prompts.jsonl": PROMPTS}),
    # -- output directory and resuming
    Case("output-dir-holds-another-run", "sft", ["--dataset", "{tmp}/lm.jsonl"], 2,
         ["'{tmp}/out' already holds a run"], ["--overwrite_output_dir true", "--resume_from_checkpoint latest"],
         {"lm.jsonl": LM, "out": run_copy()}),
    Case("resume-from-missing-checkpoint", "sft",
         ["--dataset", "{tmp}/lm.jsonl", "--resume_from_checkpoint", "{tmp}/out/checkpoint-9"], 2,
         ["'{tmp}/out/checkpoint-9' does not exist"], ["pass a checkpoint-* directory, or 'latest'"],
         {"lm.jsonl": LM, "out": run_copy()}),
    Case("resume-latest-without-checkpoint", "sft",
         ["--dataset", "{tmp}/lm.jsonl", "--resume_from_checkpoint", "latest"], 2,
         ["{tmp}/out holds no complete checkpoint"], ["drop --resume_from_checkpoint"], {"lm.jsonl": LM}),
    Case("resume-from-partial-checkpoint", "sft",
         ["--dataset", "{tmp}/lm.jsonl", "--max_steps", "4", "--resume_from_checkpoint", "{tmp}/out/checkpoint-2"], 2,
         ["'{tmp}/out/checkpoint-2' is incomplete or corrupt (no trainer_state.json)"],
         ["Resume from the newest complete checkpoint there, {tmp}/out/checkpoint-1"],
         {"lm.jsonl": LM, "out": run_copy(remove_state)}),
    Case("resume-from-corrupt-checkpoint", "sft",
         ["--dataset", "{tmp}/lm.jsonl", "--max_steps", "4", "--resume_from_checkpoint", "latest"], 2,
         ["cannot resume from {tmp}/out/checkpoint-2: the checkpoint is corrupt or incomplete"],
         ["Delete it and resume from an earlier one ({tmp}/out/checkpoint-1)"],
         {"lm.jsonl": LM, "out": run_copy(corrupt_optimizer)}),
]  # fmt: skip


@pytest.fixture
def paths(tmp_path, tiny_model_dir, odd_models, finished_run):
    return {"tmp": tmp_path, "model": tiny_model_dir, "finished": finished_run, **odd_models}


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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case, paths, tiny_model_dir, odd_models):
    write_files(case.files, paths)
    watched = (paths["tmp"], tiny_model_dir, *odd_models.values())
    before = snapshot(*watched)
    flags = [flag.format(**paths) for flag in case.flags]
    outcome = cli("train", case.method, *base_args(paths), *flags)
    assert_said(outcome, case.code, [n.format(**paths) for n in case.names], [f.format(**paths) for f in case.fix])
    assert snapshot(*watched) == before, "a refused run changed or wrote files"


def test_catalogue_has_enough_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


# -- handled with a warning ---------------------------------------------------------------------------------------


def test_prompt_longer_than_max_length_is_dropped_with_a_warning(paths):
    """DPO (like every preference method) drops a row whose prompt fills max_length, and says so."""
    data = paths["tmp"] / "pairs.jsonl"
    data.write_text(jsonl(edit(PAIRS, 1, prompt="a long prompt " * 3) + PAIRS[:1]))
    before = data.read_bytes()
    outcome = cli("train", "dpo", *base_args(paths), "--dataset", data, "--max_length", "12")
    assert_said(outcome, 0, ["dropped 1 of 9 rows (first: row 1)", "max_length=12"], ["Raise max_length"])
    assert data.read_bytes() == before


def test_tokenizer_without_pad_token_pads_with_eos(paths):
    data = paths["tmp"] / "lm.jsonl"
    data.write_text(jsonl(LM))
    outcome = cli("train", "sft", *base_args(paths), "--dataset", data, "--model", paths["nopad"])
    assert outcome.code == 0, outcome.err
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(paths["tmp"] / "out")
    assert saved.pad_token == saved.eos_token == "<|end|>"


# -- plugins ------------------------------------------------------------------------------------------------------


def test_method_from_incompatible_plugin(fake_site, paths, toy_method_source):
    fake_site.add(
        "posttrain-future",
        requires="posttrain>=9,<10",
        methods={"future": "pt_future:Toy"},
        module="pt_future",
        code=toy_method_source,
    )
    outcome = cli("train", "future", *base_args(paths))
    assert_said(
        outcome,
        2,
        ["method 'future' from posttrain-future 1.0.0 is incompatible", "needs posttrain>=9,<10"],
        ["pip install -U posttrain-future"],
    )
    assert not (paths["tmp"] / "out").exists()


def test_two_plugins_provide_the_same_method(fake_site, paths, toy_method_source):
    for package in ("pt-twin-a", "pt-twin-b"):
        module = package.replace("-", "_")
        fake_site.add(package, methods={"twin": f"{module}:Toy"}, module=module, code=toy_method_source)
    data = paths["tmp"] / "lm.jsonl"
    data.write_text(jsonl(LM))
    outcome = cli("train", "twin", *base_args(paths), "--dataset", data)
    assert_said(
        outcome, 2, ["method 'twin' is provided by pt-twin-a and pt-twin-b"], ["'pt-twin-a:twin' or 'pt-twin-b:twin'"]
    )
    assert not (paths["tmp"] / "out").exists()
    assert cli("train", "pt-twin-b:twin", *base_args(paths), "--dataset", data).code == 0


def test_method_whose_plugin_fails_to_import(fake_site, paths):
    fake_site.add("pt-crash", methods={"crash": "pt_crash:Method"}, module="pt_crash", code="import flux_capacitor\n")
    outcome = cli("train", "crash", *base_args(paths))
    assert_said(
        outcome,
        2,
        ["method 'crash' from pt-crash 1.0.0 failed to import", "No module named 'flux_capacitor'"],
        ["`posttrain doctor` shows the traceback", "POSTTRAIN_DISABLE_PLUGINS=pt-crash"],
    )


def test_method_whose_module_is_not_installed(fake_site, paths):
    fake_site.add("pt-hollow", methods={"hollow": "pt_hollow_missing:Method"})
    outcome = cli("train", "hollow", *base_args(paths))
    assert_said(
        outcome,
        2,
        ["method 'hollow' from pt-hollow 1.0.0 is broken", "'pt_hollow_missing' is not importable"],
        ["pip install --force-reinstall pt-hollow"],
    )


def test_reward_function_that_raises_names_reward_and_prompt(fake_site, paths):
    """A bug in a reward function is a bug in code: its traceback is kept, and the error names the reward,
    the prompt (its index in the micro-batch) and the dataset row."""
    fake_site.add(
        "pt-fragile-rewards",
        rewards={"fragile": "pt_fragile:fragile"},
        module="pt_fragile",
        code="def fragile(prompts, completions, **kw):\n"
        "    if any(p.startswith('5+') for p in prompts):\n"
        "        raise ValueError('cannot parse the answer')\n"
        "    return [0.0] * len(completions)\n",
    )
    data = paths["tmp"] / "prompts.jsonl"
    data.write_text(jsonl(PROMPTS))
    before = snapshot(paths["tmp"])
    flags = ["--reward_funcs", "fragile", "--num_generations", "2", "--max_completion_length", "2"]
    flags += ["--per_device_train_batch_size", "8", "--save_steps", "1"]
    with pytest.raises(
        Exception,
        match=r"reward function 'fragile' raised on completion 0 of prompt \d+ \(dataset "
        r"row 5\) at step 0: ValueError: cannot parse the answer",
    ):
        cli("train", "grpo", *base_args(paths), "--dataset", data, *flags)
    after = snapshot(paths["tmp"])
    assert {k: v for k, v in after.items() if k in before} == before
    assert not list((paths["tmp"] / "out").glob("*checkpoint*"))


# -- failures while training ----------------------------------------------------------------------------------


@pytest.fixture
def nan_toy(fake_site, toy_method_source):
    fake_site.add("posttrain-nantoy", methods={"nantoy": "pt_nantoy:Toy"}, module="pt_nantoy", code=toy_method_source)
    return fake_site


def weights_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    """Bit for bit: a resumed run repeats the uninterrupted run's arithmetic in the same order (with one torch thread
    wherever part of it ran in an ``OMP_NUM_THREADS=1`` subprocess; see ``one_torch_thread``)."""
    import torch

    wa, wb = weights_of(a), weights_of(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_disk_full_while_writing_a_checkpoint(nan_toy, paths, monkeypatch):
    """ENOSPC in the middle of checkpoint-4: a clear error, checkpoint-2 untouched, no partial checkpoint."""
    import torch

    data = paths["tmp"] / "lm.jsonl"
    data.write_text(jsonl(LM))
    out = paths["tmp"] / "out"
    real_save, seen = torch.save, {}

    def full_disk(obj, target, *args, **kwargs):
        if ".tmp-checkpoint-4" in str(target):
            seen.setdefault("checkpoint-2", snapshot(out / "checkpoint-2"))
            if str(target).endswith("optimizer.pt"):
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    args = ["train", "nantoy", *base_args(paths), "--dataset", data, "--max_steps", "6", "--save_steps", "2"]
    outcome = cli(*args)
    assert_said(
        outcome,
        2,
        ["could not write checkpoint-4: No space left on device", "optimizer.pt", f"{out}/checkpoint-2"],
        ["Free disk space", "--resume_from_checkpoint latest"],
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert snapshot(out / "checkpoint-2") == seen["checkpoint-2"]
    monkeypatch.setattr(torch, "save", real_save)
    assert cli(*args, "--resume_from_checkpoint", "latest").code == 0
    assert cli(*args, "--output_dir", paths["tmp"] / "reference").code == 0
    assert same_weights(out, paths["tmp"] / "reference")


def test_nan_loss_names_step_and_rows_and_keeps_last_checkpoint(nan_toy, paths):
    data = paths["tmp"] / "lm.jsonl"
    data.write_text(jsonl(LM))
    out = paths["tmp"] / "out"
    args = ["train", "nantoy", *base_args(paths), "--dataset", data, "--max_steps", "4", "--save_steps", "2"]
    outcome = cli(*args, "--nan_at_step", "2")
    assert_said(
        outcome,
        2,
        ["loss is nan at step 3", "rows of the batch on process 0: ["],
        ["Lower learning_rate, check those rows", "The last good checkpoint is kept"],
    )
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert cli(*args, "--resume_from_checkpoint", "latest").code == 0  # the kept checkpoint resumes
    assert cli(*args, "--output_dir", paths["tmp"] / "reference").code == 0
    assert same_weights(out, paths["tmp"] / "reference")


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


def test_ctrl_c_saves_a_resumable_checkpoint(fake_site, paths, toy_method_source, one_torch_thread):
    """SIGINT to a real ``posttrain train``: it finishes the step, writes a complete checkpoint, exits 130, and
    resuming gives the weights of an uninterrupted run."""
    fake_site.add(
        "posttrain-slowtoy",
        methods={"slowtoy": "pt_slowtoy:Toy"},
        module="pt_slowtoy",
        code=toy_method_source + SLOW_TOY,
    )
    data = paths["tmp"] / "lm.jsonl"
    data.write_text(jsonl(LM * 4))
    out = paths["tmp"] / "out"
    args = ["train", "slowtoy", *base_args(paths), "--dataset", data, "--max_steps", "40", "--logging_steps", "1"]
    env = {**os.environ, "TOY_STEP_DELAY": "0.1", "POSTTRAIN_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (checkpoint,) = [p for p in out.iterdir() if "checkpoint" in p.name]
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 40 and checkpoint.name == f"checkpoint-{step}"
    assert f"interrupted at step {step}; resumable checkpoint in {checkpoint}" in err
    assert "--resume_from_checkpoint latest" in err and "Traceback" not in err
    assert cli(*args, "--resume_from_checkpoint", "latest").code == 0
    assert cli(*args, "--output_dir", paths["tmp"] / "reference").code == 0
    assert same_weights(out, paths["tmp"] / "reference")
