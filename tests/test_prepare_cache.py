"""The prepared-data cache (``posttrain._prepare_cache``): a hit equals a miss, the key changes with everything the
rows depend on and not with run-only fields, broken or half-written entries are never read, model-computed values
are never cached, and two processes read one entry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
from posttrain import _prepare_cache as cache
from posttrain._method import TrainContext

CACHEABLE = """
    prepare_cacheable = True
    _precompute_calls = 0

    def precompute(self, rows, ctx):
        type(self)._precompute_calls += 1
        for row in rows:
            row["score"] = float(ctx.config.seed)  # stands for a model's per-run score: must never be stored
"""
COUNTING = """
    def prepare(self, dataset, ctx):
        import os
        log = os.environ.get("TOY_PREPARE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(os.environ.get("RANK", "0") + "\\n")
        return self._prepare(dataset, ctx)

    def _prepare(self, dataset, ctx):
"""


def cacheable_source(toy_method_source: str) -> str:
    """The core tests' toy method, opted in to the cache, with a ``precompute`` and a prepare that logs its calls."""
    source = toy_method_source.replace(
        '    dataset_formats = ("language_modeling",)\n', '    dataset_formats = ("language_modeling",)\n' + CACHEABLE
    )
    return source.replace("    def prepare(self, dataset, ctx):\n", COUNTING, 1)


@pytest.fixture
def toy(tmp_path, toy_method_source, monkeypatch):
    """A fresh module ``posttrain_cached_toy`` (its own file, so editing it is a code change)."""
    root = tmp_path / "toy_pkg"
    root.mkdir()
    (root / "posttrain_cached_toy.py").write_text(cacheable_source(toy_method_source))
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("posttrain_cached_toy", None)
    import posttrain_cached_toy

    yield posttrain_cached_toy
    sys.modules.pop("posttrain_cached_toy", None)


@pytest.fixture
def rows_file(tmp_path, toy_rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows))
    return path


def config(toy, tiny_model_dir, tmp_path, name="run", **kw):
    base = dict(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / name),
        max_steps=3,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
        prepare_cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return toy.ToyConfig(**base)


def entry_of(method, cfg, source, tokenizer):
    entry, _, why = cache.entry_for(method, TrainContext(config=cfg, tokenizer=tokenizer), source, "train")
    assert entry is not None, why
    return entry


def losses(result):
    return [r["loss"] for r in result.log_history if "loss" in r]


def test_a_hit_gives_the_rows_and_the_losses_of_a_miss(toy, tiny_model_dir, tmp_path, rows_file, capsys):
    from posttrain.loop import train

    toy.Toy._precompute_calls = 0
    cold = train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, "cold", dataset=str(rows_file)))
    assert "cache miss" in capsys.readouterr().out
    warm = train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, "warm", dataset=str(rows_file)))
    assert "cache hit" in capsys.readouterr().out
    assert losses(warm) == losses(cold) and len(losses(cold)) == 3  # the same rows in the same order: bit-equal
    assert toy.Toy._precompute_calls == 2  # after the cache, on both runs
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    stored, _ = cache._read(entry, entry.name)
    assert not any("score" in r for r in stored)  # precompute's values were added after the entry was written


@pytest.mark.parametrize("method_name", ["sft", "dpo"])
def test_plugin_rows_read_back_equal(method_name, tiny_model_dir, tmp_path):
    """The rows of two real methods (token lists, and DPO's prompt/chosen/rejected columns) survive the entry."""
    from posttrain import _reader
    from posttrain.models import load_tokenizer

    if method_name == "sft":
        from posttrain_sft import SFT as Method
        from posttrain_sft import SFTConfig as Config

        rows = [
            {"messages": [{"role": "user", "content": "d" * i}, {"role": "assistant", "content": "ef"}]}
            for i in range(1, 9)
        ]
    else:
        from posttrain_dpo import DPO as Method
        from posttrain_dpo import DPOConfig as Config

        rows = [{"prompt": "ab" * (i + 1), "chosen": "c" * (i + 1), "rejected": "d"} for i in range(8)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(model=str(tiny_model_dir), dataset=str(path), max_length=64, prepare_cache_dir=str(tmp_path / "c"))
    ctx = TrainContext(config=cfg, tokenizer=load_tokenizer(str(tiny_model_dir)))
    method = Method()
    prepared = method.prepare(_reader.load_checked(method, str(path)), ctx)
    entry, _, _ = cache.entry_for(method, ctx, str(path), "train")
    assert cache.store(entry, prepared, [], True) == ""
    back, _ = cache.load(entry)
    assert back == prepared
    assert [list(r) for r in back] == [list(r) for r in prepared]  # key order kept too


def test_encoding_round_trips_or_refuses(tmp_path):
    """Int and float lists, strings, nested messages, rows with different keys, bools: equal after a round trip.
    A tuple, a NaN or an int beyond 64 bits would not read back equal: the entry is not written."""
    entry = cache.Entry(tmp_path, "k" * 64, {})
    rows = [
        {"ids": [1, 2, 3], "w": [0.5, 0.25], "text": "é", "msgs": [{"role": "user", "content": "x"}], "flag": True},
        {"ids": [], "w": [1.0], "text": "", "msgs": [{"role": "user", "content": "y", "extra": None}], "flag": False},
        {"ids": [-100, 2**31 - 1], "w": [3.0], "text": "z", "msgs": [], "flag": True, "only_here": [[1], [2, 3]]},
    ]
    assert cache.store(entry, rows, [{"category": "UserWarning", "module": "builtins", "message": "m"}], True) == ""
    assert cache.load(entry) == (rows, [{"category": "UserWarning", "module": "builtins", "message": "m"}])
    big = [{"ids": [2**40]}]
    entry2 = cache.Entry(tmp_path, "b" * 64, {})
    assert cache.store(entry2, big, [], True) == "" and cache.load(entry2)[0] == big  # int64, not int32
    huge = [{"ids": [2**70, 1]}, {"ids": [2]}]  # beyond int64: stored as JSON, exactly
    entry3 = cache.Entry(tmp_path, "h" * 64, {})
    assert cache.store(entry3, huge, [], True) == "" and cache.load(entry3)[0] == huge
    for bad in ([{"ids": (1, 2)}], [{"w": [float("nan")]}], [{"t": object()}], ["not a dict"]):
        e = cache.Entry(tmp_path, "c" * 64, {})
        assert cache.store(e, bad, [], True) != ""
        assert not e.path.exists()


def test_key_follows_data_tokenizer_prep_fields_and_code_not_run_only_fields(
    toy, tiny_model_dir, tmp_path, rows_file, toy_rows
):
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    method = toy.Toy()
    base = config(toy, tiny_model_dir, tmp_path)
    key = entry_of(method, base, str(rows_file), tokenizer).key
    # run-only fields and the paths of the same content: the same entry
    same = [
        config(toy, tiny_model_dir, tmp_path, learning_rate=0.5, max_steps=9, output_dir=str(tmp_path / "elsewhere")),
        config(toy, tiny_model_dir, tmp_path, per_device_train_batch_size=2, logging_steps=5, report_to=["x"]),
    ]
    for cfg in same:
        assert entry_of(method, cfg, str(rows_file), tokenizer).key == key
    copy = tmp_path / "moved.jsonl"
    copy.write_bytes(rows_file.read_bytes())
    assert entry_of(method, base, str(copy), tokenizer).key == key
    # a field prepare reads, and one it might read (seed): another entry
    assert entry_of(method, config(toy, tiny_model_dir, tmp_path, max_length=8), str(rows_file), tokenizer).key != key
    assert entry_of(method, config(toy, tiny_model_dir, tmp_path, seed=1), str(rows_file), tokenizer).key != key
    # one changed row
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in [*toy_rows[:-1], {"text": "abc 99"}]))
    assert entry_of(method, base, str(changed), tokenizer).key != key
    # the tokenizer: a chat template, an added token, the padding side
    for change in (
        lambda t: setattr(t, "chat_template", (t.chat_template or "") + " "),
        lambda t: t.add_tokens(["<new>"]),
        lambda t: setattr(t, "padding_side", "left" if t.padding_side == "right" else "right"),
    ):
        other = load_tokenizer(str(tiny_model_dir))
        change(other)
        assert entry_of(method, base, str(rows_file), other).key != key
    # the method's code (an editable install: same version, other code)
    module_file = tmp_path / "toy_pkg" / "posttrain_cached_toy.py"
    module_file.write_text(module_file.read_text().replace("ctx.config.max_length - 1", "ctx.config.max_length - 2"))
    assert entry_of(method, base, str(rows_file), tokenizer).key != key


def test_an_unreadable_entry_is_reported_removed_and_rebuilt(toy, tiny_model_dir, tmp_path, rows_file):
    from posttrain.loop import train

    first = train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, "a", dataset=str(rows_file)))
    (entry,) = list((tmp_path / "cache").iterdir())
    columns = entry / cache.COLUMNS
    columns.write_bytes(columns.read_bytes()[:-16])  # truncated
    with pytest.warns(UserWarning, match="could not be read"):
        again = train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, "b", dataset=str(rows_file)))
    assert losses(again) == losses(first)
    (entry / cache.META).write_text("{not json")
    with pytest.warns(UserWarning, match="could not be read"):
        assert cache.load(cache.Entry(tmp_path / "cache", entry.name, {})) is None
    assert not entry.exists()


def test_a_crash_while_writing_leaves_nothing_that_is_read(toy, tiny_model_dir, tmp_path, rows_file, monkeypatch):
    from posttrain.models import load_tokenizer
    from safetensors import numpy as st_numpy

    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = config(toy, tiny_model_dir, tmp_path)
    entry = entry_of(toy.Toy(), cfg, str(rows_file), tokenizer)
    rows = [{"input_ids": [1, 2, 3], "text": "x"}] * 4

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill arriving mid-write

    monkeypatch.setattr(st_numpy, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.store(entry, rows, [], True)
    assert list(entry.root.iterdir()) == []  # the temporary directory is gone, no entry appeared
    # a writer killed outright leaves its .tmp-* directory: never read, listed as unfinished, cleared
    monkeypatch.undo()
    half = entry.root / f".tmp-{entry.key[:12]}-1-deadbeef"
    half.mkdir()
    (half / cache.META).write_text(json.dumps({"format": cache.FORMAT, "key": entry.key}))
    assert cache.load(entry) is None
    assert [e["complete"] for e in cache.entries(entry.root)] == [False]
    assert cache.store(entry, rows, [], True) == "" and cache.load(entry)[0] == rows


def test_reference_scores_are_computed_after_the_cache(tiny_model_dir, tmp_path):
    """DPO's precompute_ref_log_probs: the entry holds no reference scores; a hit with another model's weights
    scores with those weights."""
    import torch
    from posttrain.loop import train
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain_dpo import DPO, DPOConfig

    rows = [{"prompt": "ab" * (i + 1), "chosen": "c" * (i + 1), "rejected": "d"} for i in range(8)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other-model"
    model = load_causal_lm(str(tiny_model_dir), DPOConfig(model=str(tiny_model_dir)))
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # other scores, same tokenizer
    model.save_pretrained(other)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    seen = []

    class Recording(DPO):
        def precompute(self, rows, ctx):
            super().precompute(rows, ctx)
            seen.append([r["ref_chosen_logps"] for r in rows])

    def run(model_dir, name):
        cfg = DPOConfig(
            model=str(model_dir),
            dataset=str(path),
            output_dir=str(tmp_path / name),
            precompute_ref_log_probs=True,
            max_steps=1,
            per_device_train_batch_size=4,
            save_steps=0,
            disable_progress_bar=True,
            prepare_cache_dir=str(tmp_path / "cache"),
        )
        train(Recording(), cfg)

    run(tiny_model_dir, "a")
    run(other, "b")
    (entry,) = list((tmp_path / "cache").iterdir())  # one entry: the second run was a hit
    stored, _ = cache._read(entry, entry.name)
    assert not any(k.startswith("ref_") for r in stored for k in r)
    assert len(seen) == 2 and all(abs(a - b) > 1e-3 for a, b in zip(*seen))  # each run scored with its model


def test_not_cached_when_off_not_declared_or_with_images(toy, toy_module, tiny_model_dir, tmp_path, rows_file):
    from posttrain.models import load_tokenizer

    ctx = TrainContext(config=config(toy, tiny_model_dir, tmp_path, prepare_cache=False), tokenizer=None)
    assert cache.entry_for(toy.Toy(), ctx, str(rows_file), "train")[2] == "prepare_cache is off"
    ctx = TrainContext(config=config(toy_module, tiny_model_dir, tmp_path), tokenizer=None)
    assert "prepare_cacheable" in cache.entry_for(toy_module.Toy(), ctx, str(rows_file), "train")[2]
    # the plain toy trains as before and writes nothing
    from posttrain.loop import train

    train(toy_module.Toy(), config(toy_module, tiny_model_dir, tmp_path, "plain", dataset=str(rows_file)))
    assert not (tmp_path / "cache").exists()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert (
        cache.entry_for(
            toy.Toy(),
            TrainContext(config=config(toy, tiny_model_dir, tmp_path), tokenizer=tokenizer),
            object(),
            "train",
        )[0]
        is None
    )


def test_warnings_of_a_miss_are_shown_again_on_a_hit(toy, tiny_model_dir, tmp_path, rows_file, monkeypatch):
    from posttrain.loop import train

    original = toy.Toy._prepare

    def warning_prepare(self, dataset, ctx):
        warnings.warn("3 rows were cut at max_length", UserWarning, stacklevel=2)
        return original(self, dataset, ctx)

    monkeypatch.setattr(toy.Toy, "_prepare", warning_prepare)
    for name in ("cold", "warm"):
        with pytest.warns(UserWarning, match="3 rows were cut"):
            train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, name, dataset=str(rows_file)))


def test_cache_command_lists_sizes_and_clears(toy, tiny_model_dir, tmp_path, rows_file):
    from posttrain.loop import train

    train(toy.Toy(), config(toy, tiny_model_dir, tmp_path, dataset=str(rows_file)))
    run = [sys.executable, "-m", "posttrain", "cache"]
    where = ["--dir", str(tmp_path / "cache")]
    listed = subprocess.run([*run, "list", *where], capture_output=True, text=True, check=True).stdout
    assert "toy" in listed and "32 rows" in listed and str(rows_file) in listed
    sized = json.loads(subprocess.run([*run, "size", "--json", *where], capture_output=True, text=True).stdout)
    assert sized["entries"] == 1 and sized["bytes"] > 0
    cleared = subprocess.run([*run, "clear", *where], capture_output=True, text=True, check=True).stdout
    assert "removed 1 entry" in cleared and list((tmp_path / "cache").iterdir()) == []


@pytest.mark.distributed
def test_two_processes_read_one_entry(toy, tiny_model_dir, tmp_path, rows_file):
    """Cold: the main process prepares and writes (the other prepares its own rows, or reads the entry if it is
    already there). Warm: nobody prepares, both read the entry, and the losses equal the cold run's."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import posttrain_cached_toy as toy\n"
        "from posttrain.loop import train\n"
        "config = toy.ToyConfig(model=sys.argv[2], output_dir=sys.argv[3], dataset=sys.argv[4], max_steps=2,\n"
        "    learning_rate=1e-3, per_device_train_batch_size=2, logging_steps=1, disable_progress_bar=True, seed=0,\n"
        "    save_steps=0, prepare_cache_dir=sys.argv[5])\n"
        "result = train(toy.Toy(), config)\n"
        "if result.output_dir and int(__import__('os').environ.get('RANK', '0')) == 0:\n"
        "    open(sys.argv[3] + '/losses.json', 'w').write(json.dumps([r['loss'] for r in result.log_history]))\n"
    )

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    log = tmp_path / "prepared.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOY_PREPARE_LOG": str(log)}

    def launch(name):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), str(script), str(tmp_path / "toy_pkg"), str(tiny_model_dir)]
        cmd += [str(tmp_path / name), str(rows_file), str(tmp_path / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 and "address already in use" in done.stderr.lower():  # the free port was taken
            cmd[cmd.index("--master_port") + 1] = str(free_port())
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / name / "losses.json").read_text()), done.stdout

    cold, cold_out = launch("cold")
    # the main process prepared; the other one too, unless the entry was already there when it looked
    assert sorted(log.read_text().split()) in (["0"], ["0", "1"]) and "cache miss" in cold_out
    assert len(list((tmp_path / "cache").iterdir())) == 1
    log.write_text("")
    warm, warm_out = launch("warm")
    assert log.read_text() == "" and "cache hit" in warm_out  # no process prepared anything
    assert warm == cold


def test_an_unwritable_cache_directory_warns_and_trains(toy, tiny_model_dir, tmp_path, rows_file):
    from posttrain.loop import train

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="could not be written"):
        result = train(
            toy.Toy(), config(toy, tiny_model_dir, tmp_path, dataset=str(rows_file), prepare_cache_dir=str(blocked))
        )
    assert len(losses(result)) == 3
