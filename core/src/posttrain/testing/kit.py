"""The conformance kit: checks any method package (ours or a third party's) runs against itself.

Use it from a method package's tests::

    from posttrain.testing.kit import conformance_suite

    TestConformance = conformance_suite("dpo", rows=ROWS, config={"beta": 0.1}, tier="full")

Tier ``api`` (required for experimental methods): metadata, protocol, config round-trip, row-level
data validation, the experimental warning. Tier ``full`` (required for promotion) adds, on a tiny
model: the loss decreases, gradient-accumulation equivalence, padding invariance, resume
equivalence and seed determinism. A check that cannot hold for a method is listed in ``xfail`` with
the reason; it then runs as a strict xfail, so it fails loudly the day it starts passing.

Each check is also a plain function (``check_grad_accumulation(method_class, rows, ...)``) raising
``AssertionError`` with the numbers it compared, so a failure says which method, which check and
by how much. Load the kit as a pytest plugin (``-p posttrain.testing.kit``) for a summary line of
how many checks ran; zero checks run is reported as a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

API_CHECKS = ("metadata", "protocol", "config_roundtrip", "data_validation", "experimental_warning")
FULL_CHECKS = ("loss_decreases", "grad_accumulation", "padding_invariance", "resume", "determinism")
_BAD_FIELD_ORDER = ("rejected", "completion", "label", "chosen", "messages", "text", "prompt")


# -- helpers -------------------------------------------------------------------------------------------


def _resolve(method: Any) -> tuple[Any, Any]:
    """(method_class, discovery entry or None) from a name or a class."""
    if isinstance(method, str):
        from posttrain import _discovery as discovery

        entry = discovery.find("method", method, allow_inactive=True)
        return discovery.load(entry), entry
    return method, None


def _config(method_class: Any, model_dir: Path, output_dir: Path, overrides: dict, **extra: Any):
    base = {
        "model": str(model_dir),
        "output_dir": str(output_dir),
        "max_steps": 4,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 0,
        "disable_progress_bar": True,
        "overwrite_output_dir": True,
        "seed": 0,
    }
    from posttrain.config import build_config

    return build_config(method_class.config_class, {**base, **overrides, **extra})


def _train(method_class: Any, rows: list[dict], config: Any, rewards: dict | None = None):
    from posttrain.loop import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(method_class(), config, train_dataset=copy.deepcopy(rows), rewards=rewards)


def _weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(output_dir).glob("*model*.safetensors"))
    assert files, f"no saved weights in {output_dir}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _max_weight_diff(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key in a:
        d = (a[key].float() - b[key].float()).abs().max().item()
        if d > worst:
            worst, name = d, key
    return worst, name


def _losses(result: Any) -> list[float]:
    return [row["loss"] for row in result.log_history if "loss" in row]


def _close(a: list[float], b: list[float], rtol: float, atol: float = 1e-7) -> tuple[bool, float]:
    """Relative comparison, with an absolute floor for losses that are ~0 by construction (RLOO)."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    ok = len(a) == len(b) and all(
        d <= atol + (rtol * max(abs(x), abs(y)) if max(abs(x), abs(y)) else 0.0) for d, x, y in zip(diffs, a, b)
    )
    worst = max((d / max(abs(x), abs(y), 1e-8) for d, x, y in zip(diffs, a, b)), default=0.0)
    return ok, worst


def tiny_model(path: Path, **kwargs: Any) -> Path:
    from posttrain.testing.tiny import build_tiny_model

    if not (Path(path) / "config.json").is_file():
        build_tiny_model(path, **kwargs)
    return Path(path)


# -- api tier --------------------------------------------------------------------------------------------


def check_metadata(method_name: str) -> None:
    from posttrain import _discovery as discovery

    entries = [e for e in discovery.discover(("method",)) if e.name == method_name]
    assert entries, f"method {method_name!r}: no 'posttrain.methods' entry point is installed under that name"
    e = entries[0]
    assert e.status not in (discovery.BROKEN, discovery.INCOMPATIBLE, discovery.CONFLICT), (
        f"method {method_name!r} ({e.package}): status {e.status}: {e.reason}"
    )
    assert e.summary, f"method {method_name!r} ({e.package}): the distribution has no Summary (description)"
    assert e.requires_core and ">=" in e.requires_core, (
        f"method {method_name!r} ({e.package}): declare the core range you support, e.g. 'posttrain>=0.1,<1' "
        f"(found {e.requires_core!r})"
    )
    from importlib import metadata

    classifiers = metadata.distribution(e.package).metadata.get_all("Classifier") or []
    statuses = [c for c in classifiers if c.startswith("Development Status")]
    assert len(statuses) == 1, (
        f"method {method_name!r} ({e.package}): needs exactly one Development Status classifier, has {statuses}"
    )


def check_protocol(method_class: Any) -> None:
    from posttrain.config import TrainingConfig

    where = f"{getattr(method_class, '__module__', '?')}.{getattr(method_class, '__name__', method_class)}"
    for attr in ("name", "config_class", "dataset_formats", "prepare", "collate", "loss"):
        assert hasattr(method_class, attr), f"{where} lacks {attr!r} required by the Method protocol"
    assert dataclasses.is_dataclass(method_class.config_class), f"{where}.config_class must be a dataclass"
    assert issubclass(method_class.config_class, TrainingConfig), f"{where}.config_class must extend TrainingConfig"
    assert isinstance(method_class.dataset_formats, tuple) and method_class.dataset_formats, (
        f"{where}.dataset_formats must be a non-empty tuple of format names"
    )
    method_class()  # the loop instantiates methods with no arguments


def check_config_roundtrip(method_class: Any, tmp_path: Path, overrides: dict) -> None:
    from posttrain._errors import ConfigError
    from posttrain.config import config_to_dict, load_config, save_config

    config = _config(method_class, tmp_path / "model", tmp_path / "out", overrides)
    save_config(config, tmp_path / "config.yaml", method_class.name)
    again = load_config(method_class.config_class, tmp_path / "config.yaml")
    a, b = config_to_dict(config), config_to_dict(again)
    diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    assert not diff, f"{method_class.name}: config fields change after a YAML round-trip: {diff}"
    field = dataclasses.fields(method_class.config_class)[-1].name
    typo = field[:-1] + ("x" if field[-1] != "x" else "y")
    try:
        load_config(method_class.config_class, None, {typo: "1"})
    except ConfigError as exc:
        assert field in str(exc), f"{method_class.name}: unknown key {typo!r} should suggest {field!r}: {exc}"
    else:
        raise AssertionError(f"{method_class.name}: unknown config key {typo!r} was accepted")


def check_data_validation(
    method_class: Any, rows: list[dict], model_dir: Path, overrides: dict, bad_field: str | None = None
) -> None:
    import datasets

    from posttrain._errors import DataError
    from posttrain._method import TrainContext
    from posttrain.models import load_tokenizer

    rows = copy.deepcopy(rows)
    field = bad_field or next((f for f in _BAD_FIELD_ORDER if f in rows[0]), None)
    assert field, f"{method_class.name}: cannot tell which field to remove; pass bad_field="
    bad_index = min(3, len(rows) - 1)
    rows[bad_index] = {k: v for k, v in rows[bad_index].items() if k != field}
    config = _config(method_class, model_dir, model_dir.parent / "out-data", overrides)
    ctx = TrainContext(config=config, tokenizer=load_tokenizer(str(model_dir)))
    dataset = datasets.Dataset.from_list(rows)
    try:
        method_class().prepare(dataset, ctx)
    except DataError as exc:
        text = str(exc)
        assert str(bad_index) in text and field in text, (
            f"{method_class.name}: the error for row {bad_index} missing {field!r} should name both: {text}"
        )
    else:
        raise AssertionError(f"{method_class.name}: prepare accepted row {bad_index} without its {field!r} field")


def check_experimental_warning(method_name: str) -> None:
    from posttrain import _discovery as discovery
    from posttrain import _registry as registry
    from posttrain._errors import ExperimentalWarning

    discovery._warned.discard(method_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, entry = registry.resolve_method(method_name, allow_inactive=True)
        registry.resolve_method(method_name, allow_inactive=True)
    ours = [w for w in caught if issubclass(w.category, ExperimentalWarning) and f"'{method_name}'" in str(w.message)]
    if entry is not None and entry.declared_status == discovery.EXPERIMENTAL:
        silenced = discovery._silenced(method_name)
        expected = 0 if silenced else 1
        assert len(ours) == expected, (
            f"{method_name} is experimental: expected {expected} ExperimentalWarning, got {len(ours)}"
        )
    else:
        assert not ours, f"{method_name} is stable but emitted: {ours[0].message}"


# -- full tier --------------------------------------------------------------------------------------------


def check_loss_decreases(
    method_class, rows, model_dir, tmp_path, overrides, rewards=None, steps=8, metric="loss", direction="decrease"
) -> None:
    config = _config(method_class, model_dir, tmp_path / "decrease", overrides, max_steps=steps)
    history = _train(method_class, rows, config, rewards).log_history
    values = [row[metric] for row in history if metric in row]
    assert len(values) >= 2, f"{method_class.name}: metric {metric!r} was logged {len(values)} times"
    assert all(v == v and abs(v) != float("inf") for v in values), f"{method_class.name}: non-finite {metric}: {values}"
    half = len(values) // 2
    first, last = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
    ok = last < first if direction == "decrease" else last > first
    assert ok, (
        f"{method_class.name}: {metric} should {direction} over {steps} steps; mean of first half "
        f"{first:.5f}, second half {last:.5f} (values {[round(v, 5) for v in values]})"
    )


def check_grad_accumulation(
    method_class, rows, model_dir, tmp_path, overrides, rewards=None, rtol=1e-5, atol=1e-5, batch_unit=1
) -> None:
    """batch 4 x accumulation 1 == 1 x 4 == 2 x 2, in units of ``batch_unit`` items (an online method's
    group size: its batch counts completions, num_generations per prompt)."""
    runs = {}
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        config = _config(
            method_class,
            model_dir,
            tmp_path / f"ga-{bs}x{ga}",
            overrides,
            max_steps=2,
            per_device_train_batch_size=bs * batch_unit,
            gradient_accumulation_steps=ga,
        )
        runs[(bs, ga)] = (_losses(_train(method_class, rows, config, rewards)), _weights(config.output_dir))
    ref_losses, ref_weights = runs[(4, 1)]
    for (bs, ga), (losses, weights) in runs.items():
        ok, worst = _close(ref_losses, losses, rtol)
        assert ok, (
            f"{method_class.name}: batch 4 x accumulation 1 and batch {bs} x accumulation {ga} give different "
            f"losses {ref_losses} vs {losses} (max relative difference {worst:.2e} > {rtol}); the loss must "
            "return a sum and its item count, not a mean"
        )
        diff, name = _max_weight_diff(ref_weights, weights)
        assert diff <= atol, (
            f"{method_class.name}: weights after 2 steps differ between batch 4 x 1 and "
            f"{bs} x {ga} by {diff:.2e} (parameter {name})"
        )


def check_padding_invariance(method_class, rows, model_dir, overrides, rtol=1e-4) -> None:
    """loss_sum([a, b]) == loss_sum([a]) + loss_sum([b]) for rows of different lengths (eval mode)."""
    import torch

    from posttrain._method import TrainContext
    from posttrain.models import load_causal_lm, load_tokenizer

    config = _config(method_class, model_dir, model_dir.parent / "out-pad", overrides)
    tokenizer = load_tokenizer(str(model_dir))
    model = (
        load_causal_lm(str(model_dir), config)
        if not hasattr(method_class, "load_model")
        else method_class().load_model(config)
    )
    model.eval()
    method = method_class()
    ctx = TrainContext(config=config, tokenizer=tokenizer, model=model, model_path=str(model_dir), training=False)
    if hasattr(method, "setup"):
        method.setup(ctx)
    # Move the policy away from the freshly loaded reference, so reference-relative terms
    # (KL points, rewards) are non-zero and padding has something to disturb.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p) * 0.02)
    import datasets

    prepared = method.prepare(datasets.Dataset.from_list(copy.deepcopy(rows)), ctx)
    sizes = [len(str(r)) for r in prepared]
    a, b = prepared[sizes.index(min(sizes))], prepared[sizes.index(max(sizes))]

    def loss_of(rows: list) -> Any:
        batch = method.collate(rows, ctx)
        if hasattr(method, "rollout"):  # online methods score what they generate
            batch = method.rollout(model, [batch], ctx)[0]
        return method.loss(model, batch, ctx)

    with torch.no_grad():
        pair = loss_of([a, b])
        one, two = loss_of([a]), loss_of([b])
    together, apart = float(pair.loss_sum), float(one.loss_sum) + float(two.loss_sum)
    assert abs(together - apart) <= 1e-6 + rtol * abs(apart), (
        f"{method_class.name}: padding changes the loss: rows batched together sum to {together:.6f}, "
        f"separately {apart:.6f}"
    )
    assert float(pair.n_items) == float(one.n_items) + float(two.n_items), (
        f"{method_class.name}: n_items is not additive: {pair.n_items} vs {one.n_items} + {two.n_items}"
    )


def check_resume(method_class, rows, model_dir, tmp_path, overrides, rewards=None, atol=1e-6) -> None:
    full = _config(method_class, model_dir, tmp_path / "resume-full", overrides, max_steps=4, save_steps=2)
    uninterrupted = _train(method_class, rows, full, rewards)
    resumed_dir = tmp_path / "resume-part"
    shutil.copytree(tmp_path / "resume-full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    part = _config(
        method_class,
        model_dir,
        resumed_dir,
        overrides,
        max_steps=4,
        save_steps=2,
        resume_from_checkpoint="latest",
        overwrite_output_dir=False,
    )
    resumed = _train(method_class, rows, part, rewards)
    ok, worst = _close(_losses(uninterrupted)[2:], _losses(resumed), 1e-6)
    assert ok, (
        f"{method_class.name}: resumed run's losses {_losses(resumed)} differ from the uninterrupted run's "
        f"steps 3-4 {_losses(uninterrupted)[2:]} (max relative difference {worst:.2e})"
    )
    diff, name = _max_weight_diff(_weights(full.output_dir), _weights(resumed_dir))
    assert diff <= atol, f"{method_class.name}: resumed final weights differ by {diff:.2e} (parameter {name})"


def check_determinism(method_class, rows, model_dir, tmp_path, overrides, rewards=None) -> None:
    outs = []
    for i in range(2):
        config = _config(method_class, model_dir, tmp_path / f"det-{i}", overrides, max_steps=2)
        outs.append((_losses(_train(method_class, rows, config, rewards)), config.output_dir))
    assert outs[0][0] == outs[1][0], f"{method_class.name}: same seed, different losses {outs[0][0]} vs {outs[1][0]}"
    diff, name = _max_weight_diff(_weights(outs[0][1]), _weights(outs[1][1]))
    assert diff == 0.0, f"{method_class.name}: same seed, weights differ by {diff:.2e} (parameter {name})"


# -- the pytest suite --------------------------------------------------------------------------------------

_stats = {"suites": 0, "ran": 0, "passed": 0, "failed": 0, "xfailed": 0, "skipped": 0}


def conformance_suite(
    method: Any,
    rows: list[dict],
    config: dict | None = None,
    tier: str = "full",
    xfail: dict[str, str] | None = None,
    rewards: dict | None = None,
    model_kwargs: dict | None = None,
    bad_field: str | None = None,
    progress_metric: str = "loss",
    progress_direction: str = "decrease",
    progress_steps: int = 8,
    batch_unit: int = 1,
) -> type:
    """A pytest test class with one test per check. ``method`` is an installed name (or a class).

    Args:
        rows: at least 8 raw rows in the method's dataset format.
        config: method config overrides for the tiny runs (``max_length``, ``beta``, ...).
        tier: "api" or "full".
        xfail: check name -> reason, for checks that cannot hold for this method (strict xfail).
        rewards: reward functions by name, for online methods.
        model_kwargs: passed to ``build_tiny_model`` (architecture, hidden_size, ...).
        progress_metric / progress_direction: what "learning" means for the loss_decreases check
            (e.g. ``"reward"``, ``"increase"`` for online RL).
        batch_unit: items per dataset row when a row expands into several (an online method's
            ``num_generations``): batch sizes the checks use are multiples of it.
    """
    import pytest

    if tier not in ("api", "full"):
        raise ValueError(f"tier must be 'api' or 'full', got {tier!r}")
    if len(rows) < 8:
        raise ValueError(f"conformance_suite needs at least 8 rows, got {len(rows)}")
    xfail = dict(xfail or {})
    unknown = set(xfail) - set(API_CHECKS + FULL_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks in xfail: {sorted(unknown)}; checks are {API_CHECKS + FULL_CHECKS}")
    overrides = {"per_device_train_batch_size": 4 * batch_unit, "per_device_eval_batch_size": 4 * batch_unit}
    overrides.update(config or {})
    label = method if isinstance(method, str) else getattr(method, "name", str(method))
    _stats["suites"] += 1

    def _model_dir(cls, tmp_path_factory):
        return tiny_model(tmp_path_factory.mktemp(f"kit-{label}") / "model", **(model_kwargs or {}))

    model_dir = pytest.fixture(scope="class", name="model_dir")(classmethod(_model_dir))

    def resolved():
        return _resolve(method)[0]

    checks = {
        "metadata": lambda self, model_dir, tmp_path: (
            check_metadata(label)
            if isinstance(method, str)
            else pytest.skip("method given as a class: no installed metadata to check")
        ),
        "protocol": lambda self, model_dir, tmp_path: check_protocol(resolved()),
        "config_roundtrip": lambda self, model_dir, tmp_path: check_config_roundtrip(resolved(), tmp_path, overrides),
        "data_validation": lambda self, model_dir, tmp_path: check_data_validation(
            resolved(), rows, model_dir, overrides, bad_field
        ),
        "experimental_warning": lambda self, model_dir, tmp_path: (
            check_experimental_warning(label) if isinstance(method, str) else pytest.skip("method given as a class")
        ),
        "loss_decreases": lambda self, model_dir, tmp_path: check_loss_decreases(
            resolved(),
            rows,
            model_dir,
            tmp_path,
            overrides,
            rewards,
            progress_steps,
            progress_metric,
            progress_direction,
        ),
        "grad_accumulation": lambda self, model_dir, tmp_path: check_grad_accumulation(
            resolved(), rows, model_dir, tmp_path, overrides, rewards, batch_unit=batch_unit
        ),
        "padding_invariance": lambda self, model_dir, tmp_path: check_padding_invariance(
            resolved(), rows, model_dir, overrides
        ),
        "resume": lambda self, model_dir, tmp_path: check_resume(
            resolved(), rows, model_dir, tmp_path, overrides, rewards
        ),
        "determinism": lambda self, model_dir, tmp_path: check_determinism(
            resolved(), rows, model_dir, tmp_path, overrides, rewards
        ),
    }
    names = API_CHECKS + (FULL_CHECKS if tier == "full" else ())
    namespace: dict[str, Any] = {
        "model_dir": model_dir,
        "__doc__": f"posttrain conformance kit, tier {tier}, for {label}",
    }
    for name in names:
        func = checks[name]

        def test(self, model_dir, tmp_path, _func=func):
            _func(self, model_dir, tmp_path)

        test.__name__ = f"test_{name}"
        test.__doc__ = f"conformance check {name!r} for method {label!r}"
        test = pytest.mark.posttrain_conformance(test)
        if name in xfail:
            test = pytest.mark.xfail(reason=xfail[name], strict=True)(test)
        namespace[test.__name__] = test
    return type(f"TestConformance_{label.replace('-', '_')}", (), namespace)


# -- pytest plugin hooks (active with -p posttrain.testing.kit) ----------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    if "posttrain_conformance" not in report.keywords:
        return
    if report.skipped and not hasattr(report, "wasxfail"):
        _stats["skipped"] += 1
        return
    _stats["ran"] += 1
    if hasattr(report, "wasxfail"):
        _stats["xfailed"] += 1
    elif report.passed:
        _stats["passed"] += 1
    elif report.failed:
        _stats["failed"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _stats["suites"]:
        return
    s = _stats
    terminalreporter.write_line(
        f"posttrain conformance: {s['ran']} checks ran in {s['suites']} suite(s): {s['passed']} passed, "
        f"{s['failed']} failed, {s['xfailed']} xfailed ({s['skipped']} skipped)"
    )


def pytest_sessionfinish(session, exitstatus):
    deselected = bool(session.config.getoption("keyword", "") or session.config.getoption("markexpr", ""))
    if _stats["suites"] and _stats["ran"] == 0 and not deselected and session.testscollected:
        session.exitstatus = 1  # a conformance suite that runs nothing proves nothing
