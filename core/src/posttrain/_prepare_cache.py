"""The prepared-data cache: ``method.prepare``'s rows kept on disk, keyed by a hash of everything they depend on.

Tokenizing 100k rows costs about a minute of CPU (a chat template, then the tokenizer, per row); a restart, a
resume after preemption or the next experiment on the same data reads the rows back in a second or two instead.

Design decisions:

- **Who may be cached.** A method opts in with ``prepare_cacheable = True``: its ``prepare`` promises to depend only
  on the rows, the tokenizer/processor, the config and its own package's code (never on ``ctx.model``, never on
  randomness outside ``seed``). Values a model computes for one run (reference log-probs,
  ``precompute_ref_log_probs``) belong in the method's ``precompute(rows, ctx)``, which the loop calls *after* the
  cache, on every run: they are never stored. A method that does not opt in is prepared as before.
- **The key** is a SHA-256 over: the cache format; the method's name, class, distribution version and a digest of
  every ``.py`` file of its package (editable installs change code without changing the version); the same for
  core, plus the versions of transformers, tokenizers, datasets and jinja2 (chat templates); the data's content
  (a local file's bytes, every file of a saved dataset directory, a ``datasets.Dataset``'s fingerprint for
  in-memory and hub datasets) with the split; the tokenizer (and processor) as ``save_pretrained`` writes them, so
  vocabulary, added tokens, special tokens, chat template and padding side all count; and the whole config except
  :data:`RUN_ONLY` (optimizer, schedule, steps, batch sizes, logging, checkpoints, precision, LoRA: fields only
  the loop reads) and the data paths (their content is in the key instead). A false miss costs time; a false hit
  trains on the wrong data, so anything not known to be run-only is in the key. The model path is not: a method
  that opted in does not read the model, and the tokenizer is hashed itself.
- **Not cached**: rows with images (their files are not hashed), rows that are not plain dicts of JSON values
  (tensors, numpy arrays, tuples), sources that are neither a local path nor a ``datasets.Dataset`` or hub name.
- **Storage, no pickle**: columns whose every value is a list of ints (or of floats) go into one safetensors file
  as a flat array plus per-row lengths (int32 where the values fit); every other value is one JSON line per row.
  A write that would not read back equal (a tuple, NaN, an int beyond 64 bits) is not stored. Reading builds the
  Python lists with the garbage collector paused, which is most of the speed (2.0 s -> 0.2 s per 20M tokens).
- **Atomic**: an entry is written into ``.tmp-*`` beside it and renamed into place, ``meta.json`` last; a reader
  only opens renamed entries, so a crash leaves no entry that is read. An entry that does not read back (missing
  file, wrong sizes, bad JSON) is reported as a warning, removed and rebuilt; it never fails a run.
- **Processes**: every process computes the key and reads a complete entry; on a miss each prepares its rows as
  before and only the main process writes. Two runs writing one key race harmlessly: the second rename fails and
  its copy is dropped (both hold the same rows).
- **Warnings** raised while reading, checking and preparing the data are stored with the entry and shown again on
  a hit, so a warm run warns exactly like a cold one.
- **Where**: ``prepare_cache_dir``, else ``$POSTTRAIN_CACHE/prepared``, else ``$XDG_CACHE_HOME/posttrain/prepared``,
  else ``~/.cache/posttrain/prepared``. ``prepare_cache: false`` turns it off; ``posttrain cache list|size|clear``
  manages it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

FORMAT = 1
META, COLUMNS, ROWS = "meta.json", "columns.safetensors", "rows.jsonl"

#: TrainingConfig fields only the loop reads: they never change what ``prepare`` returns, so they are not in the key.
RUN_ONLY = frozenset(
    {
        "dataset",  # the data's content is in the key instead of its paths
        "eval_dataset",
        "model",  # the tokenizer and processor are hashed themselves
        "output_dir",
        "overwrite_output_dir",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "group_by_length",
        "dtype",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "attn_implementation",
        "use_cpu",
        "torch_compile",
        "ddp_timeout",
        "freeze",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "save_on_interrupt",
        "resume_from_checkpoint",
        "resume_override",
        "report_to",
        "tracker_options",
        "disable_progress_bar",
        "allow_inactive",
        "prepare_cache",
        "prepare_cache_dir",
    }
)


def default_root() -> Path:
    """Where entries live when the config names no ``prepare_cache_dir``."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"]).expanduser() / "prepared"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "posttrain" / "prepared"


def root_for(config: Any) -> Path | None:
    """The cache directory of a run, or None when ``prepare_cache`` is off."""
    if not getattr(config, "prepare_cache", False):
        return None
    given = getattr(config, "prepare_cache_dir", None)
    return Path(given).expanduser() if given else default_root()


# -- the key -----------------------------------------------------------------------------------------------


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_digest(root: Path, pattern: str = "*") -> str:
    """Every file under ``root`` matching ``pattern``: relative names and contents (``__pycache__`` skipped)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode())
        h.update(_file_digest(path).encode())
    return h.hexdigest()


@functools.cache
def _distributions() -> dict[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()


def _distribution_names(top: str):
    """The distribution that installs package ``top``: by the naming rule first, then by scanning (lazily)."""
    yield top.replace("_", "-")
    yield from _distributions().get(top, [])


def code_digest(module_name: str) -> tuple[str, str]:
    """(distribution version or "", digest of the code) of the top-level package of a module, or of the module's
    own file when it belongs to no package with a file (a script, a test module); ("", "") when it has no file.

    The files are read on every call (a few milliseconds): an editable install changes them, not the version.
    """
    import importlib
    import importlib.metadata
    import sys

    module = sys.modules.get(module_name)
    top_name = module_name.split(".")[0]
    top = sys.modules.get(top_name)
    if top is None:
        try:
            top = importlib.import_module(top_name)
        except ImportError:
            top = None
    top_file = getattr(top, "__file__", None)
    if top_file and Path(top_file).name == "__init__.py":
        digest = _tree_digest(Path(top_file).parent, "*.py")
    elif getattr(module, "__file__", None):
        digest = _file_digest(Path(module.__file__))
    elif top_file:
        digest = _file_digest(Path(top_file))
    else:
        return "", ""
    version = ""
    for dist in _distribution_names(top_name):
        try:
            version = f"{dist}=={importlib.metadata.version(dist)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return version, digest


def method_code(method: Any) -> tuple[str, str]:
    """Versions and code digest of every package a method's class and its bases come from (a subclass of another
    plugin's method runs that plugin's ``prepare``); ("", "") when one of them has no file to hash."""
    versions, digests = [], []
    for cls in type(method).__mro__:
        if cls is object:
            continue
        version, digest = code_digest(cls.__module__)
        if not digest:
            return "", ""
        if digest not in digests:
            versions.append(version)
            digests.append(digest)
    return " ".join(v for v in versions if v), _sha(*(d.encode() for d in digests))


def _library_versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in ("transformers", "tokenizers", "datasets", "jinja2"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ""
    return found


#: Tokenizer settings that change its output but that ``save_pretrained`` may leave out (transformers 5 does not
#: write ``padding_side``, for example).
_TOKENIZER_ATTRIBUTES = (
    "padding_side",
    "truncation_side",
    "model_max_length",
    "chat_template",
    "add_bos_token",
    "add_eos_token",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
    "special_tokens_map",
)


def _saved_digest(obj: Any) -> str:
    """A tokenizer or processor as ``save_pretrained`` writes it, plus :data:`_TOKENIZER_ATTRIBUTES` (of its inner
    tokenizer too), hashed: vocabulary, added and special tokens, normalisation, chat template, sides, lengths."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="posttrain-tok-") as tmp:
        obj.save_pretrained(tmp)
        saved = _tree_digest(Path(tmp))
    settings = {}
    for holder in (obj, getattr(obj, "tokenizer", None)):
        if holder is not None:
            settings[type(holder).__name__] = {a: getattr(holder, a, None) for a in _TOKENIZER_ATTRIBUTES}
    return _sha(saved.encode(), json.dumps(settings, sort_keys=True, default=repr).encode())


def source_digest(source: Any, split: str) -> tuple[str | None, str, Any]:
    """(digest of the data's content or None, a short description, the source to read it from).

    A hub name is loaded here (through ``datasets``' own cache) for its fingerprint, and the loaded dataset is
    returned so it is not loaded twice.
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source = source[split] if split in source else source
    if isinstance(source, datasets.Dataset):
        fingerprint = getattr(source, "_fingerprint", None)
        return (_sha(b"dataset", fingerprint.encode()) if fingerprint else None), "a datasets.Dataset", source
    if isinstance(source, list):
        try:
            text = json.dumps(source, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            return None, "a list of rows", source
        return _sha(b"list", text.encode()), "a list of rows", source
    if not isinstance(source, (str, Path)):
        return None, type(source).__name__, source
    path = Path(source).expanduser()
    if path.is_file():
        return (
            _sha(b"file", path.suffix.lower().encode(), _file_digest(path).encode(), split.encode()),
            str(path),
            source,
        )
    if path.is_dir():
        return _sha(b"dir", _tree_digest(path).encode(), split.encode()), str(path), source
    from posttrain import data

    try:
        loaded = data.load_dataset(str(source), split)
    except Exception:  # not found or not a dataset: the normal path reports it with its own message
        return None, str(source), source
    digest, _, _ = source_digest(loaded, split)
    return digest, str(source), loaded


def config_digest_fields(config: Any) -> dict:
    """The config fields in the key: all of them except :data:`RUN_ONLY`."""
    from posttrain.config import config_to_dict

    fields = config_to_dict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return {k: v for k, v in sorted(fields.items()) if k not in RUN_ONLY}


@dataclasses.dataclass
class Entry:
    """The cache slot of one dataset of one run."""

    root: Path
    key: str
    description: dict  # what went into the key, in words, for ``posttrain cache list``

    @property
    def path(self) -> Path:
        return self.root / self.key

    @property
    def short(self) -> str:
        return self.key[:12]


def entry_for(method: Any, ctx: Any, source: Any, split: str) -> tuple[Entry | None, Any, str]:
    """(the entry for this dataset or None, the source to read, why not cached when None)."""
    root = root_for(ctx.config)
    if root is None:
        return None, source, "prepare_cache is off"
    if getattr(method, "prepare_cacheable", False) is not True:
        return None, source, f"method {getattr(method, 'name', method)!r} does not declare prepare_cacheable"
    data_digest, described, source = source_digest(source, split)
    if data_digest is None:
        return None, source, f"{described} has no content digest"
    method_version, method_digest = method_code(method)
    if not method_digest:
        return None, source, f"the code of method {getattr(method, 'name', method)!r} has no file to hash"
    core_version, core_code = code_digest("posttrain")
    tokenizer = _saved_digest(ctx.tokenizer) if ctx.tokenizer is not None else ""
    processor = _saved_digest(ctx.processor) if getattr(ctx, "processor", None) is not None else ""
    parts = {
        "format": FORMAT,
        "method": [getattr(method, "name", ""), f"{type(method).__module__}.{type(method).__qualname__}"],
        "method_code": [method_version, method_digest],
        "core_code": [core_version, core_code],
        "libraries": _library_versions(),
        "data": data_digest,
        "tokenizer": tokenizer,
        "processor": processor,
        "config": config_digest_fields(ctx.config),
    }
    text = json.dumps(parts, sort_keys=True, default=repr)
    description = {
        "method": getattr(method, "name", ""),
        "plugin": method_version,
        "data": described,
        "split": split,
        "tokenizer": str(getattr(ctx.tokenizer, "name_or_path", "")),
    }
    return Entry(root, hashlib.sha256(text.encode()).hexdigest(), description), source, ""


# -- reading -------------------------------------------------------------------------------------------------


class _Unreadable(Exception):
    pass


def load(entry: Entry, is_main: bool = True) -> tuple[list[dict], list[dict]] | None:
    """(rows, recorded warnings) of a complete entry; None when there is none. An unreadable entry is reported as a
    warning and removed (by the main process only, which writes the new one), so the caller prepares again."""
    if not (entry.path / META).is_file():
        return None
    try:
        return _read(entry.path, entry.key)
    except (_Unreadable, OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        warnings.warn(
            f"the prepared-data cache entry {entry.path} could not be read ({type(exc).__name__}: {exc}); "
            "preparing the data again and rewriting it.",
            UserWarning,
            stacklevel=2,
        )
        if is_main:
            discard(entry.path)
        return None


def _read(path: Path, key: str) -> tuple[list[dict], list[dict]]:
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise _Unreadable(f"format {meta.get('format')} / key {str(meta.get('key'))[:12]} do not match")
    for name, size in meta["files"].items():
        if (path / name).stat().st_size != size:
            raise _Unreadable(f"{name} has {(path / name).stat().st_size} bytes, the entry says {size}")
    n = meta["n_rows"]
    enabled = gc.isenabled()
    gc.disable()  # millions of small lists: the collector's passes over them are most of the cost
    try:
        columns = {}
        if meta["columns"]:
            from safetensors.numpy import load_file

            arrays = load_file(str(path / COLUMNS))
            for name in meta["columns"]:
                values, lengths = arrays[f"{name}.values"].tolist(), arrays[f"{name}.lengths"]
                if len(lengths) != n or int(lengths.sum()) != len(values):
                    raise _Unreadable(f"column {name!r} does not hold {n} rows")
                ends = lengths.cumsum().tolist()
                columns[name] = [values[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        if meta["json"]:
            with open(path / ROWS, encoding="utf-8") as f:
                extra = [json.loads(line) for line in f]
            if len(extra) != n:
                raise _Unreadable(f"{ROWS} holds {len(extra)} rows, the entry says {n}")
        else:
            extra = [{}] * n
        names = list(columns)
        rows = [dict(zip(names, values), **more) for values, more in zip(zip(*columns.values()), extra)]
        if not names:
            rows = [dict(more) for more in extra]
        order = meta.get("order")
        if order and names and meta["json"]:  # every row had these keys in this order
            rows = [{k: row[k] for k in order} for row in rows]
    finally:
        if enabled:
            gc.enable()
    return rows, meta.get("warnings", [])


# -- writing ---------------------------------------------------------------------------------------------------


def _numeric(values: list) -> tuple[str, Any] | None:
    """("int"/"float", flat numpy array) when every value is a list of ints (or of floats), else None."""
    import numpy as np

    if not all(type(v) is list for v in values):
        return None
    types = set(map(type, itertools.chain.from_iterable(values)))
    total = sum(map(len, values))
    if types <= {int}:
        try:
            flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int64, count=total)
        except OverflowError:
            return None
        if total and np.iinfo(np.int32).min <= flat.min() and flat.max() <= np.iinfo(np.int32).max:
            flat = flat.astype(np.int32)
        return "int", flat
    if types == {float}:
        flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.float64, count=total)
        return ("float", flat) if np.isfinite(flat).all() else None  # NaN != NaN: it would not read back equal
    return None


def _encode(rows: Any) -> tuple[dict, dict, list[str] | None, list[str]] | str:
    """(numeric arrays, column kinds, JSON lines or None, key order) of the rows; a string says why they cannot be
    stored exactly."""
    import numpy as np

    if not isinstance(rows, list) or not rows or not all(type(r) is dict for r in rows):
        return "the prepared rows are not a list of dicts"
    order = list(rows[0])
    uniform = all(len(r) == len(order) and list(r) == order for r in rows)
    arrays, kinds = {}, {}
    for name in order if uniform else []:
        found = _numeric([r[name] for r in rows])
        if found is not None:
            kinds[name], flat = found
            arrays[f"{name}.values"] = flat
            arrays[f"{name}.lengths"] = np.fromiter((len(r[name]) for r in rows), dtype=np.int64, count=len(rows))
    lines = None
    if not uniform or len(kinds) < len(order):
        lines = []
        for i, row in enumerate(rows):
            rest = {k: v for k, v in row.items() if k not in kinds}
            try:
                line = json.dumps(rest, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                return f"row {i} holds a value JSON cannot store exactly ({exc})"
            if json.loads(line) != rest:
                return f"row {i} would not read back equal (a tuple or a subclass of a JSON type)"
            lines.append(line)
    return arrays, kinds, lines, order if uniform else []


def store(entry: Entry, rows: Any, recorded: list[dict], is_main: bool) -> str:
    """Write the entry (main process only), atomically; returns why nothing was written, or ""."""
    if not is_main:
        return "not the main process"
    encoded = _encode(rows)
    if isinstance(encoded, str):
        return encoded
    try:
        _write(entry, rows, recorded, *encoded)
    except OSError as exc:  # a full disk, a read-only directory: the run goes on, prepared as before
        warnings.warn(
            f"the prepared-data cache entry could not be written to {entry.root} ({exc}); the run goes on without "
            "it. Free space, set prepare_cache_dir to a writable directory, or set prepare_cache false.",
            UserWarning,
            stacklevel=2,
        )
        return str(exc)
    return ""


def _write(entry: Entry, rows: list, recorded: list[dict], arrays: dict, kinds: dict, lines: Any, order: list) -> None:
    entry.root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(entry.root)
    tmp = entry.root / f".tmp-{entry.key[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        if arrays:
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp / COLUMNS))
            files[COLUMNS] = (tmp / COLUMNS).stat().st_size
        if lines is not None:
            with open(tmp / ROWS, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
            files[ROWS] = (tmp / ROWS).stat().st_size
        meta = {
            "format": FORMAT,
            "key": entry.key,
            "n_rows": len(rows),
            "columns": kinds,
            "json": lines is not None,
            "order": order,
            "files": files,
            "warnings": recorded,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "about": entry.description,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for name in [*files, META]:  # on disk before the rename makes the entry visible
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, entry.path)
        except OSError:  # another run wrote this key first: same rows, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard(path: Path) -> None:
    """Remove an entry: renamed out of the way first, so no reader opens it half-deleted."""
    trash = path.parent / f".tmp-trash-{path.name[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(root: Path, age_s: float = 24 * 3600) -> None:
    """Leftovers of writers that crashed (a day old: a live writer takes seconds)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


# -- warnings, replayed on a hit ------------------------------------------------------------------------------------


def _distinct(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """Each warning once per text and place, as Python's "default" action shows them (not once per row)."""
    seen, kept = set(), []
    for w in caught:
        mark = (str(w.message), w.category, w.filename, w.lineno)
        if mark not in seen:
            seen.add(mark)
            kept.append(w)
    return kept


def recorded_warnings(caught: list[warnings.WarningMessage]) -> list[dict]:
    return [
        {"category": w.category.__name__, "module": w.category.__module__, "message": str(w.message)}
        for w in _distinct(caught)
    ]


def replay(caught: list[warnings.WarningMessage]) -> None:
    """Show warnings recorded by ``catch_warnings(record=True)`` as if nothing had caught them."""
    for w in _distinct(caught):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def replay_recorded(recorded: list[dict]) -> None:
    """Show the warnings stored with an entry again (their class when it can be imported, else UserWarning)."""
    import importlib

    for item in recorded:
        category: type[Warning] = UserWarning
        try:
            found = getattr(importlib.import_module(item["module"]), item["category"])
            if isinstance(found, type) and issubclass(found, Warning):
                category = found
        except (ImportError, AttributeError, KeyError):
            pass
        warnings.warn(item.get("message", ""), category, stacklevel=3)


# -- listing, for ``posttrain cache`` -------------------------------------------------------------------------------


def entries(root: Path) -> list[dict]:
    """Every entry under ``root`` with its size and what it holds; unfinished writes are listed as such."""
    found = []
    if not root.is_dir():
        return found
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        item = {"key": path.name, "path": str(path), "bytes": size, "complete": False}
        if not path.name.startswith(".tmp-"):
            try:
                meta = json.loads((path / META).read_text())
                item.update(complete=True, rows=meta["n_rows"], created=meta["created"], **meta.get("about", {}))
            except (OSError, ValueError, KeyError):
                pass
        found.append(item)
    return found
