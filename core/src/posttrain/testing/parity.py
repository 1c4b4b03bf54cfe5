"""Parity and benchmark results as ``posttrain promote`` accepts them: measured figures, not a verdict.

A method package records how its implementation compares with a reference (another library's trainer
on the same model, data and hyperparameters; or a baseline for a benchmark) in ``parity/result.json``,
written by a script in ``parity/`` with :func:`write_result`::

    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method="kto",
        reference="TRL 1.16.0 KTOTrainer",
        compared="per-step training loss, 10 steps, fp32 CPU",
        tolerance=1e-4,
        comparisons={"kto": (trl_losses, posttrain_losses), "kto_weighted": (trl_w, posttrain_w)},
    )

The file (format ``posttrain.result/1``) holds:

- ``method``, ``kind`` (``"parity"`` or ``"benchmark"``), ``reference`` (what was compared against, with its
  version), ``compared`` (what quantity, on what setup);
- ``statistic`` (how ``measured`` follows from the figures: ``max_rel_diff``, ``max_abs_diff`` or ``max_ratio``),
  ``measured`` and ``tolerance``; ``passed`` is ``measured <= tolerance``;
- ``comparisons``: the figures. Each is ``{"name", "reference": [...], "measured": [...]}`` (paired numbers the
  statistic is recomputed from) or ``{"name", "value": x, "note": ...}`` (a statistic computed by the script
  over numbers too many to store, such as every parameter's gradient);
- ``source``: ``{"hash": "sha256:...", "files": N}`` of the package's ``src/`` tree when the script ran, so a
  result never outlives the code it measured;
- ``run``: date, posttrain, Python and torch versions, the command; ``details``: anything else.

``posttrain promote`` recomputes the statistic from the figures, compares it with ``measured`` and the
tolerance, and the source hash with the package's current source (:func:`result_problems`).

.. versionadded:: 1.0
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "STATISTICS", "compute_statistic", "read_result", "result_problems", "source_hash", "write_result"]

FORMAT = "posttrain.result/1"
"""The ``format`` value of a result file this version writes and reads.

.. versionadded:: 1.0
"""
STATISTICS = ("max_rel_diff", "max_abs_diff", "max_ratio")
"""How ``measured`` follows from paired figures: the largest ``|m - r| / max(|m|, |r|)``, the largest
``|m - r|``, or the largest ``m / r`` (a benchmark's time or memory against its baseline).

.. versionadded:: 1.0
"""
_SKIPPED_DIRS = ("__pycache__",)


def source_hash(package_root: str | Path) -> tuple[str, int]:
    """("sha256:<hex>", number of files) over every file of ``package_root/src`` (paths and contents).

    Caches and build metadata (``__pycache__``, ``*.egg-info``, ``*.pyc``) are left out, so installing or
    importing the package does not change the hash; anything else under ``src/`` does.

    .. versionadded:: 1.0
    """
    src = Path(package_root) / "src"
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist; the source hash covers a package's src/ tree")
    digest = hashlib.sha256()
    files = 0
    for path in sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix()):  # byte order, as git sorts
        rel = path.relative_to(src)
        if (
            not path.is_file()
            or path.suffix == ".pyc"
            or any(p in _SKIPPED_DIRS or p.endswith(".egg-info") for p in rel.parts)
        ):
            continue
        digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        files += 1
    return f"sha256:{digest.hexdigest()}", files


def _pair_statistic(statistic: str, reference: Sequence[float], measured: Sequence[float]) -> float:
    if len(reference) != len(measured) or not reference:
        raise ValueError(f"paired figures need equal, non-zero lengths, got {len(reference)} and {len(measured)}")
    values = []
    for r, m in zip(reference, measured):
        r, m = float(r), float(m)
        if statistic == "max_rel_diff":
            values.append(abs(m - r) / max(abs(m), abs(r), 1e-12))
        elif statistic == "max_abs_diff":
            values.append(abs(m - r))
        elif statistic == "max_ratio":
            values.append(m / r if r else math.inf)
        else:
            raise ValueError(f"unknown statistic {statistic!r}; use one of {STATISTICS}")
    return max(values)


def compute_statistic(statistic: str, comparisons: Sequence[Mapping[str, Any]]) -> float:
    """``statistic`` over every comparison: recomputed from paired figures, taken as given from ``value`` ones.

    .. versionadded:: 1.0
    """
    if not comparisons:
        raise ValueError("a result needs at least one comparison")
    out = []
    for c in comparisons:
        if "value" in c:
            out.append(float(c["value"]))
        else:
            out.append(_pair_statistic(statistic, c["reference"], c["measured"]))
    return max(out)


def _comparison_list(comparisons: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    if isinstance(comparisons, Mapping):
        out = []
        for name, figures in comparisons.items():
            if isinstance(figures, Mapping):
                out.append({"name": name, **figures})
            else:
                reference, measured = figures
                out.append({"name": name, "reference": list(reference), "measured": list(measured)})
        return out
    return [dict(c) for c in comparisons]


def write_result(
    path: str | Path,
    *,
    method: str,
    reference: str,
    compared: str,
    tolerance: float,
    comparisons: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    statistic: str = "max_rel_diff",
    kind: str = "parity",
    package_root: str | Path | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict:
    """Write a ``posttrain.result/1`` file and return what was written.

    Args:
        path: where to write, normally ``<package>/parity/result.json``.
        method: the method name.
        reference: what the figures were compared against, with its version ("TRL 1.16.0 DPOTrainer").
        compared: the quantity and setup ("per-step training loss, 10 steps, tiny Llama, fp32 CPU").
        tolerance: the largest acceptable value of ``statistic``.
        comparisons: name -> (reference figures, measured figures), or name -> ``{"value": x, "note": ...}``
            for a statistic the script computed itself; or a list of such dicts with a ``name``.
        statistic: one of :data:`STATISTICS`.
        kind: ``"parity"`` (against another implementation) or ``"benchmark"`` (against a baseline).
        package_root: the package whose ``src/`` is hashed; default the parent of ``path``'s folder.
        details: anything else worth keeping (hyperparameters, versions, per-case notes).

    .. versionadded:: 1.0
    """
    path = Path(path)
    if kind not in ("parity", "benchmark"):
        raise ValueError(f"kind must be 'parity' or 'benchmark', got {kind!r}")
    figures = _comparison_list(comparisons)
    measured = compute_statistic(statistic, figures)
    digest, files = source_hash(package_root or path.parent.parent)
    try:
        from importlib.metadata import version

        posttrain_version = version("posttrain")
    except Exception:  # running from a source tree
        posttrain_version = "unknown"
    torch_version = sys.modules["torch"].__version__ if "torch" in sys.modules else None
    result = {
        "format": FORMAT,
        "kind": kind,
        "method": method,
        "reference": reference,
        "compared": compared,
        "statistic": statistic,
        "measured": measured,
        "tolerance": tolerance,
        "passed": measured <= tolerance,
        "comparisons": figures,
        "source": {"hash": digest, "files": files},
        "run": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "posttrain": posttrain_version,
            "python": platform.python_version(),
            "torch": torch_version,
            "command": " ".join(sys.argv),
        },
        "details": dict(details or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def read_result(path: str | Path) -> dict:
    """The parsed result file; ``ValueError`` naming the file when it is not JSON.

    .. versionadded:: 1.0
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); write it with posttrain.testing.parity.write_result"
        ) from None


def result_problems(data: Mapping[str, Any], package_root: str | Path | None = None) -> list[str]:
    """Everything that stops ``data`` from standing for a measured, passing, current result.

    Checks the format and the fields, recomputes the statistic from the figures (it must equal
    ``measured`` and be within ``tolerance``), and, given ``package_root``, compares the recorded source hash
    with the package's ``src/`` now. Each problem is a sentence that says what to do.

    .. versionadded:: 1.0
    """
    if data.get("format") != FORMAT:
        return [
            f"the file is not in the {FORMAT} format (format {data.get('format')!r}): a bare verdict such as "
            '{"passed": true} proves nothing; write the measured figures with posttrain.testing.parity.write_result'
        ]
    problems = []
    for key, kind in (("method", str), ("reference", str), ("compared", str), ("statistic", str)):
        if not isinstance(data.get(key), kind) or not data.get(key):
            problems.append(f"{key!r} is missing or empty")
    for key in ("measured", "tolerance"):
        if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool):
            problems.append(f"{key!r} must be a number")
    comparisons = data.get("comparisons")
    if not isinstance(comparisons, list) or not comparisons:
        problems.append("'comparisons' holds no figures; record the compared numbers, not only their summary")
    if problems:
        return problems
    if data["statistic"] not in STATISTICS:
        return [f"unknown statistic {data['statistic']!r}; use one of {', '.join(STATISTICS)}"]
    try:
        recomputed = compute_statistic(data["statistic"], comparisons)
    except (KeyError, TypeError, ValueError) as exc:
        return [
            f"the figures cannot be read ({type(exc).__name__}: {exc}); each comparison needs reference and "
            "measured lists, or a value"
        ]
    if not math.isclose(recomputed, float(data["measured"]), rel_tol=1e-9, abs_tol=1e-15):
        problems.append(
            f"the figures give {data['statistic']} = {recomputed:.6g}, but the file claims {data['measured']:.6g}; "
            "run the script again instead of editing the file"
        )
    if recomputed > float(data["tolerance"]):
        problems.append(
            f"{data['statistic']} = {recomputed:.3g} exceeds the tolerance {data['tolerance']:.3g} against "
            f"{data['reference']}; fix the difference and run the script again"
        )
    if data.get("passed") is not (recomputed <= float(data["tolerance"])):
        problems.append(f"'passed' says {data.get('passed')} but the figures say otherwise")
    if package_root is not None:
        recorded = (data.get("source") or {}).get("hash")
        try:
            current, _ = source_hash(package_root)
        except FileNotFoundError as exc:
            problems.append(str(exc))
        else:
            if recorded != current:
                problems.append(
                    f"the result was measured on other source (hash {str(recorded)[:19]}..., now {current[:19]}...): "
                    "src/ changed since the script ran; run it again so the result describes this code"
                )
    return problems
