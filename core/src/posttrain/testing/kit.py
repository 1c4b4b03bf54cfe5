"""The conformance kit: checks any method package (ours or a third party's) runs against itself.

Use it from a method package's tests::

    from posttrain.testing.kit import conformance_suite

    TestConformance = conformance_suite("dpo", rows=ROWS, config={"beta": 0.1}, tier="full")

Tier ``api`` (required for experimental methods): metadata, protocol (the method's declared members and
the callbacks and hooks its package registers, near misses included), config round-trip, row-level data
validation, the experimental warning. Tier ``full`` (required for promotion) adds, on a tiny model: the
loss decreases, gradient-accumulation equivalence, padding invariance, resume equivalence, seed
determinism, a frozen reference (no gradient reaches, and no step changes, any module the method keeps
beside the policy, nor the base weights under LoRA) and unchanged batches (``rollout`` and ``loss`` leave
the batch they are given as it was). A check that cannot hold for a method is listed in ``xfail`` with
the reason; it then runs as a strict xfail, so it fails loudly the day it starts passing.

Tier ``full`` of a method that declares ``supports_images = True`` adds the image checks
(:data:`IMAGE_CHECKS`) on a tiny vision-language model (:func:`posttrain.testing.build_tiny_vlm`) and rows with
synthetic images (the ``image_rows`` argument, by default :func:`posttrain.testing.colour_rows` in the method's
first dataset format): the images reach the model (other images give another loss), gradient-accumulation
equivalence and padding invariance with pixel values in the batch.

Tier ``full`` of a method that declares ``supports_padding_free = True`` adds the padding-free checks
(:data:`PADDING_FREE_CHECKS`): ``padding_free: true`` gives the padded batch's loss, item count and gradients to
float32 rounding while the model really sees one (1, N) row, ``padding_free: "auto"`` reaches every forward of
``loss`` through :func:`posttrain.models.pack_batch` (packed where the estimate favours it, padded where not, the
same numbers either way), and a model that lets packed sequences attend to each other is refused at ``setup``.

Tier ``full`` of a method that declares ``prepare_cacheable = True`` adds ``prepare_cached``
(:data:`PREPARE_CACHE_CHECKS`): ``prepare`` runs without a model and without ``setup`` (it may not read
``ctx.model``), gives the same rows twice, and its rows read back equal from a prepared-data cache entry.

Each check is also a plain function (``check_grad_accumulation(method_class, rows, ...)``) raising
``AssertionError`` with the numbers it compared and, when a normalisation check fails, what it found
by probing the loss (a mean instead of a sum, padded positions scored or counted, rows influencing each
other). Load the kit as a pytest plugin (``-p posttrain.testing.kit``) for a summary line of how many
checks ran; zero checks run is reported as a failure.

.. versionadded:: 0.1
.. versionchanged:: 1.0 ``protocol`` checks declared optional members and registered callbacks; the
   ``reference_frozen`` and ``batch_unchanged`` checks; failures say what probing found; the image checks.
.. versionchanged:: 1.1 the ``prepare_cached`` check.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "API_CHECKS",
    "FULL_CHECKS",
    "IMAGE_CHECKS",
    "MIN_ROWS",
    "PADDING_FREE_CHECKS",
    "PREPARE_CACHE_CHECKS",
    "check_batch_unchanged",
    "check_config_roundtrip",
    "check_data_validation",
    "check_determinism",
    "check_experimental_warning",
    "check_grad_accumulation",
    "check_images_reach_model",
    "check_loss_decreases",
    "check_metadata",
    "check_padding_free",
    "check_padding_free_auto",
    "check_padding_free_refused",
    "check_padding_invariance",
    "check_prepare_cached",
    "check_protocol",
    "check_reference_frozen",
    "check_resume",
    "conformance_suite",
    "default_image_rows",
    "tiny_model",
]

API_CHECKS = ("metadata", "protocol", "config_roundtrip", "data_validation", "experimental_warning")
"""The checks of tier ``api``, in the order they run.

.. versionadded:: 0.1
"""
FULL_CHECKS = (
    "loss_decreases",
    "grad_accumulation",
    "padding_invariance",
    "resume",
    "determinism",
    "reference_frozen",
    "batch_unchanged",
)
"""The checks tier ``full`` adds to :data:`API_CHECKS`.

.. versionadded:: 0.1
.. versionchanged:: 1.0 ``reference_frozen`` and ``batch_unchanged`` added.
"""
IMAGE_CHECKS = ("images_reach_model", "image_grad_accumulation", "image_padding_invariance")
"""The checks tier ``full`` adds for a method that declares ``supports_images``, on a tiny vision-language model.

.. versionadded:: 1.0
"""
PADDING_FREE_CHECKS = ("padding_free", "padding_free_auto", "padding_free_refused")
"""The checks tier ``full`` adds for a method that declares ``supports_padding_free``.

.. versionadded:: 1.0
.. versionchanged:: 1.0 ``padding_free_auto`` added.
"""
PREPARE_CACHE_CHECKS = ("prepare_cached",)
"""The checks tier ``full`` adds for a method that declares ``prepare_cacheable``.

.. versionadded:: 1.1
"""
MIN_ROWS = 8
"""The fewest raw rows :func:`conformance_suite` accepts (a step of batch 4 x accumulation 1, twice).

.. versionadded:: 1.0
"""
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
    """A tiny random causal LM at ``path`` (built once; reused when ``config.json`` is there).

    .. versionadded:: 0.1
    """
    from posttrain.testing.tiny import build_tiny_model

    if not (Path(path) / "config.json").is_file():
        build_tiny_model(path, **kwargs)
    return Path(path)


def _live_method(
    method_class: Any,
    rows: list[dict],
    model_dir: Path,
    overrides: dict,
    *,
    training: bool,
    rewards: dict | None = None,
    **extra: Any,
):
    """A method set up as the loop sets it up (model, LoRA, tokenizer, ``setup``, ``prepare``), without the loop,
    for checks that call ``collate`` / ``rollout`` / ``loss`` themselves. Returns (method, model, ctx, rows)."""
    import datasets

    from posttrain._method import TrainContext, optional_member
    from posttrain.models import apply_peft, load_causal_lm, load_processor, load_tokenizer
    from posttrain.vision import freeze_parts, is_vision_language_model

    config = _config(method_class, model_dir, model_dir.parent / "out-direct", overrides, **extra)
    processor = load_processor(str(model_dir)) if is_vision_language_model(str(model_dir)) else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(str(model_dir))
    method = method_class()
    load = optional_member(method, "load_model")
    model = load(config) if load else load_causal_lm(str(model_dir), config)
    freeze_parts(model, config.freeze)
    model = apply_peft(model, config)
    model.train(training)
    ctx = TrainContext(
        config=config,
        tokenizer=tokenizer,
        model=model,
        model_path=str(model_dir),
        training=training,
        rewards=dict(rewards or {}),
        processor=processor,
    )
    setup = optional_member(method, "setup")
    if setup:
        setup(ctx)
    prepared = method.prepare(datasets.Dataset.from_list(copy.deepcopy(rows)), ctx)
    precompute = optional_member(method, "precompute")
    if precompute:
        precompute(prepared, ctx)  # as the loop does, after prepare
    return method, model, ctx, prepared


def _perturb(model: Any, scale: float = 0.02) -> None:
    """Move the policy away from the freshly loaded reference, so reference-relative terms (KL, implicit
    rewards) are non-zero and padding or a mean has something to disturb."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)


def _loss_of(method: Any, model: Any, ctx: Any, rows: list) -> tuple[float, float]:
    """(loss_sum, n_items) of one micro-batch of prepared ``rows``, without gradients."""
    import torch

    from posttrain._method import optional_member

    with torch.no_grad():
        batch = method.collate(list(rows), ctx)
        rollout = optional_member(method, "rollout")
        if rollout:  # online methods score what they generate; the same seed keeps probes comparable
            torch.manual_seed(0)
            batch = rollout(model, [batch], ctx)[0]  # rollout takes and returns the step's micro-batches
        out = method.loss(model, batch, ctx)
    return float(out.loss_sum), float(out.n_items)


def _shortest_and_longest(prepared: Any) -> tuple[Any, Any]:
    sizes = [len(str(r)) for r in prepared]
    return prepared[sizes.index(min(sizes))], prepared[sizes.index(max(sizes))]


def _close_to(x: float, y: float, rtol: float = 1e-4) -> bool:
    return abs(x - y) <= 1e-6 + rtol * max(abs(x), abs(y))


def _normalisation_findings(method: Any, model: Any, ctx: Any, prepared: Any) -> str:
    """Why losses depend on how rows are batched, found by probing ``loss`` on chosen micro-batches.

    1. A row alone and the same row twice (no padding involved): a sum doubles, a mean stays.
    2. A short row alone, a long row alone, and both together (the short one padded): a sum that ignores
       padding adds up, and so do the counts.
    """
    a, b = _shortest_and_longest(prepared)
    one, twice = _loss_of(method, model, ctx, [a]), _loss_of(method, model, ctx, [a, a])
    found = []
    if not _close_to(twice[1], 2 * one[1]):
        found.append(
            f"n_items does not double when a row is batched with a copy of itself ({one[1]:g} alone, {twice[1]:g} "
            "for two copies): n_items must count the items loss_sum sums over"
        )
    if _close_to(twice[0], one[0]) and not _close_to(one[0], 0.0):
        return "; ".join(
            [
                f"loss_sum stays {one[0]:.6g} when the row is batched with a copy of itself (a sum would double to "
                f"{2 * one[0]:.6g}): loss returns a mean, not a sum; return the sum over items and their count "
                "as n_items (the loop divides by the count of the whole optimizer step)",
                *found,
            ]
        )
    if not _close_to(twice[0], 2 * one[0]):
        found.append(
            f"loss_sum of a row batched with a copy of itself is {twice[0]:.6g}, neither the row's {one[0]:.6g} (a "
            f"mean) nor twice it, {2 * one[0]:.6g} (a sum): rows of a micro-batch influence each other's loss"
        )
        return "; ".join(found)
    short, long = one, _loss_of(method, model, ctx, [b])
    both = _loss_of(method, model, ctx, [a, b])
    if not _close_to(both[1], short[1] + long[1]):
        found.append(
            f"n_items counts padded positions: a short row batched with a longer one counts {both[1]:g} items, alone "
            f"{short[1]:g} + {long[1]:g}; mask padding (attention_mask == 0) out of the count"
        )
    if not _close_to(both[0], short[0] + long[0]):
        found.append(
            f"padding changes the loss: a short row batched with a longer one sums to {both[0]:.6g}, the two rows "
            f"alone to {short[0] + long[0]:.6g}, while a row and its copy add up exactly (so loss returns a sum); "
            "padded positions are scored: mask them out of the loss (labels -100, a completion or loss mask), "
            "or rows of different lengths influence each other"
        )
    if not found:
        return (
            "probing found no cause: loss_sum doubles with a row's copy and adds up across a short and a long "
            "row, so neither a mean nor padding explains it; look for state kept between micro-batches or steps, "
            "or batch statistics over more than two rows"
        )
    return "; ".join(found)


def _diagnose(method_class: Any, rows: list[dict], model_dir: Path, overrides: dict, rewards: dict | None) -> str:
    try:
        method, model, ctx, prepared = _live_method(
            method_class, rows, model_dir, overrides, training=False, rewards=rewards
        )
        model.eval()
        _perturb(model)
        return _normalisation_findings(method, model, ctx, prepared)
    except Exception as exc:  # the diagnosis is a hint; never hide the original failure behind it
        return f"probing the loss to find the cause failed ({type(exc).__name__}: {exc})"


# -- api tier --------------------------------------------------------------------------------------------


def check_metadata(method_name: str) -> None:
    """The installed distribution declares what ``posttrain list`` needs: an entry point, a summary, a core
    range with a lower bound and exactly one ``Development Status`` classifier.

    .. versionadded:: 0.1
    """
    from posttrain import _discovery as discovery

    entries = [e for e in discovery.discover(("method",)) if e.name == method_name]
    assert entries, f"method {method_name!r}: no 'posttrain.methods' entry point is installed under that name"
    e = entries[0]
    assert e.status not in (discovery.BROKEN, discovery.INCOMPATIBLE, discovery.CONFLICT), (
        f"method {method_name!r} ({e.package}): status {e.status}: {e.reason}"
    )
    assert e.summary, f"method {method_name!r} ({e.package}): the distribution has no Summary (description)"
    assert e.requires_core and ">=" in e.requires_core, (
        f"method {method_name!r} ({e.package}): declare the core range you support, e.g. 'posttrain>=1.0,<2' "
        f"(found {e.requires_core!r})"
    )
    from importlib import metadata

    classifiers = metadata.distribution(e.package).metadata.get_all("Classifier") or []
    statuses = [c for c in classifiers if c.startswith("Development Status")]
    assert len(statuses) == 1, (
        f"method {method_name!r} ({e.package}): needs exactly one Development Status classifier, has {statuses}"
    )


def check_protocol(method_class: Any, distribution: str | None = None) -> None:
    """The Method protocol (declared members, their signatures, near misses) and the package's hooks and callbacks.

    Runs :func:`posttrain._method.method_problems` (``rolout`` instead of ``rollout`` is a failure, not a member
    that silently never runs), checks the config class, instantiates the method with no arguments as the loop
    does, and, given the installed ``distribution``, registers each of its ``posttrain.plugins`` modules on a
    fresh plugin manager (an unknown hook name fails) and checks every callback they add with
    :func:`posttrain._method.callback_problems`.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 near misses and signatures of optional members; the package's hooks and callbacks.
    """
    from posttrain._method import method_problems
    from posttrain.config import TrainingConfig

    where = f"{getattr(method_class, '__module__', '?')}.{getattr(method_class, '__name__', method_class)}"
    problems = method_problems(method_class)
    assert not problems, "the Method protocol is not met:\n  " + "\n  ".join(problems)
    assert dataclasses.is_dataclass(method_class.config_class), f"{where}.config_class must be a dataclass"
    assert issubclass(method_class.config_class, TrainingConfig), f"{where}.config_class must extend TrainingConfig"
    assert isinstance(method_class.dataset_formats, tuple) and method_class.dataset_formats, (
        f"{where}.dataset_formats must be a non-empty tuple of format names"
    )
    instance = method_class()  # the loop instantiates methods with no arguments
    problems = method_problems(instance)  # members set in __init__ (self.rolout = ...) count too
    assert not problems, "the Method protocol is not met by an instance:\n  " + "\n  ".join(problems)
    if distribution is not None:
        problems = _package_hook_problems(distribution, method_class.config_class)
        assert not problems, f"{distribution}'s hooks or callbacks:\n  " + "\n  ".join(problems)


def _package_hook_problems(distribution: str, config_class: type) -> list[str]:
    """Unknown hook names in the distribution's ``posttrain.plugins`` modules, and every callback problem."""
    import difflib
    from importlib import metadata

    import pluggy

    from posttrain import hookspecs
    from posttrain._method import callback_problems

    entries = [ep for ep in metadata.distribution(distribution).entry_points if ep.group == "posttrain.plugins"]
    if not entries:
        return []
    # a plugin may add its callback only when named in report_to (as loggers do): name them all. The dataclass
    # is built directly: a method's required fields (a teacher path) do not matter to its hooks
    config = config_class(report_to=["all", *(ep.name for ep in entries)])
    specs = [n for n in dir(hookspecs) if n.startswith("posttrain_")]
    problems = []
    for ep in entries:
        module = ep.load()
        manager = pluggy.PluginManager("posttrain")
        manager.add_hookspecs(hookspecs)
        try:
            manager.register(module, name=ep.name)
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            unknown = [
                n for n in dir(module) if n.startswith("posttrain_") and n not in specs and callable(getattr(module, n))
            ]
            hints = [
                f"{n!r} is not a posttrain hook; did you mean {close[0]!r}?"
                for n in unknown
                if (close := difflib.get_close_matches(n, specs, n=1, cutoff=0.75))
            ]
            problems.append(f"plugin {ep.name!r} ({ep.value}): {exc}" + (f" ({'; '.join(hints)})" if hints else ""))
            continue
        from posttrain._registry import CallbackRegistry

        registry = CallbackRegistry()
        manager.hook.posttrain_add_callbacks(registry=registry, config=config)
        for callback in registry.callbacks:
            problems += [f"plugin {ep.name!r}: {p}" for p in callback_problems(callback)]
    return problems


def check_config_roundtrip(method_class: Any, tmp_path: Path, overrides: dict) -> None:
    """The config survives a YAML save and load, and an unknown key fails with a "did you mean".

    .. versionadded:: 0.1
    """
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
    """A row missing a required field (``bad_field``, or the first of rejected/completion/label/...) makes
    ``prepare`` raise :class:`posttrain.DataError` naming the row and the field.

    .. versionadded:: 0.1
    """
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
    """An experimental method warns exactly once per process (unless silenced); a stable one never warns.

    .. versionadded:: 0.1
    """
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
    """On a tiny model, ``metric`` improves over ``steps`` steps: the mean of the second half of the logged
    values is below (or, with ``direction="increase"``, above) the mean of the first half.

    .. versionadded:: 0.1
    """
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
    """Batch 4 x accumulation 1, 1 x 4 and 2 x 2 give the same losses and the same weights after 2 steps, in
    units of ``batch_unit`` items (an online method's group size: its batch counts completions,
    ``num_generations`` per prompt).

    On a failure the loss is probed to say why (:func:`_normalisation_findings`): a mean instead of a sum,
    padding scored or counted, or rows influencing each other.

    ``atol`` (on the weights) is for the kit's learning rate of 1e-3 and grows with a larger one: Adam's first
    updates are about ``lr * sign(grad)``, so float32 rounding in the gradient of an element whose gradient is near 0
    moves that element by a share of ``lr``; a real accumulation bug changes the update direction, by O(lr).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 a failure names the cause probing found; ``batch_unit``.
    .. versionchanged:: 1.0 ``atol`` scales with a learning rate above 1e-3.
    """
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
        atol_weights = atol * max(1.0, config.learning_rate / 1e-3)
    ref_losses, ref_weights = runs[(4, 1)]
    for (bs, ga), (losses, weights) in runs.items():
        ok, worst = _close(ref_losses, losses, rtol)
        if not ok:
            raise AssertionError(
                f"{method_class.name}: batch 4 x accumulation 1 and batch {bs} x accumulation {ga} give different "
                f"losses {ref_losses} vs {losses} (max relative difference {worst:.2e} > {rtol}). Probing the loss: "
                + _diagnose(method_class, rows, model_dir, overrides, rewards)
            )
        diff, name = _max_weight_diff(ref_weights, weights)
        if diff > atol_weights:
            raise AssertionError(
                f"{method_class.name}: weights after 2 steps differ between batch 4 x 1 and {bs} x {ga} by {diff:.2e} "
                f"(> {atol_weights:.0e}, parameter {name}) although the logged losses agree. Probing the loss: "
                + _diagnose(method_class, rows, model_dir, overrides, rewards)
            )


def check_padding_invariance(method_class, rows, model_dir, overrides, rtol=1e-4, rewards=None) -> None:
    """loss_sum([a, b]) == loss_sum([a]) + loss_sum([b]) for rows of different lengths (eval mode), counts too.

    On a failure a row and its own copy are probed as well, so a loss that returns a mean is named as such
    instead of being blamed on padding.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 a failure says whether a mean, the count or the padded positions are at fault.
    """
    method, model, ctx, prepared = _live_method(
        method_class, rows, model_dir, overrides, training=False, rewards=rewards
    )
    model.eval()
    _perturb(model)
    a, b = _shortest_and_longest(prepared)
    pair = _loss_of(method, model, ctx, [a, b])
    one, two = _loss_of(method, model, ctx, [a]), _loss_of(method, model, ctx, [b])
    together, apart = pair[0], one[0] + two[0]
    loss_ok = abs(together - apart) <= 1e-6 + rtol * abs(apart)
    count_ok = pair[1] == one[1] + two[1]
    if not (loss_ok and count_ok):
        seen = (
            f"rows batched together sum to {together:.6f} over {pair[1]:g} items, separately {apart:.6f} over "
            f"{one[1]:g} + {two[1]:g}"
        )
        raise AssertionError(
            f"{method_class.name}: batching a short row with a longer one changes the loss: {seen}. Probing the "
            f"loss: {_normalisation_findings(method, model, ctx, prepared)}"
        )


def _loss_and_grads(method_class, rows, model_dir, overrides, rewards, padding_free: bool | str):
    """(loss_sum, n_items, gradients by parameter name, batch sizes of the policy's forwards in ``loss``) of one
    micro-batch of four prepared rows of different lengths, eval mode, on the perturbed tiny model."""
    import torch

    from posttrain._method import optional_member

    torch.manual_seed(0)  # a head the method initialises at load (a reward model's) is the same in both runs
    method, model, ctx, prepared = _live_method(
        method_class, rows, model_dir, {**overrides, "padding_free": padding_free}, training=False, rewards=rewards
    )
    model.eval()
    _perturb(model)
    by_size = sorted(prepared, key=lambda r: len(str(r)))
    picked = [by_size[0], by_size[-1], by_size[len(by_size) // 2], by_size[1]]
    batch = method.collate(picked, ctx)
    rollout = optional_member(method, "rollout")
    if rollout:  # the same seed, so both layouts score the same completions
        torch.manual_seed(0)
        with torch.no_grad():
            batch = rollout(model, [batch], ctx)[0]
    widths: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].size(0)))
    try:
        out = method.loss(model, batch, ctx)
    finally:
        hook.remove()
    model.zero_grad()
    out.loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss_sum.detach()), float(out.n_items), grads, widths


def check_padding_free(method_class, rows, model_dir, overrides, rewards=None) -> None:
    """``padding_free: true`` gives the padded micro-batch's loss sum, item count and gradients, and the model sees
    one (1, N) row: four rows of different lengths, eval mode, the perturbed tiny model.

    .. versionadded:: 1.0
    """
    padded = _loss_and_grads(method_class, rows, model_dir, overrides, rewards, padding_free=False)
    free = _loss_and_grads(method_class, rows, model_dir, overrides, rewards, padding_free=True)
    name = method_class.name
    assert free[3] and all(w == 1 for w in free[3]), (
        f"{name}: with padding_free true the model's forwards in loss got batches of {free[3]} rows; a padding-free "
        "micro-batch is one row (posttrain.ops.pack_sequences or token_stats(padding_free=True))"
    )
    assert any(w > 1 for w in padded[3]), f"{name}: with padding_free false every forward had one row ({padded[3]})"
    _assert_same_loss_and_grads(name, padded, free, "padding-free")


def _assert_same_loss_and_grads(name: str, padded: tuple, free: tuple, layout: str) -> None:
    """``free``'s loss sum, item count and gradients (:func:`_loss_and_grads`) equal ``padded``'s to rounding."""
    from posttrain.testing._rounding import ITEM_SCALE, LOGPROB_ROUNDINGS, rounding_tolerance

    assert padded[1] == free[1], f"{name}: n_items is {padded[1]:g} padded but {free[1]:g} {layout}"
    # The same sums of per-token terms out of forward passes, grouped and masked differently: each of the n items
    # is off by rounding of LOGPROB_ROUNDINGS operations on numbers of size ITEM_SCALE at most (rounding.py)
    n = max(padded[1], 1.0)
    tolerance = rounding_tolerance(abs(padded[0]) + ITEM_SCALE * n, LOGPROB_ROUNDINGS + int(n))
    assert abs(padded[0] - free[0]) <= tolerance, (
        f"{name}: loss_sum {padded[0]:.8f} padded but {free[0]:.8f} {layout} (allowed {tolerance:.1e}); "
        "sequences that share the row may see each other, or a sequence's first token is scored"
    )
    # a gradient entry sums the same per-token products; its terms are at most ITEM_SCALE x the largest entry of
    # that parameter's gradient per item
    for key, g in padded[2].items():
        other = free[2].get(key)
        assert other is not None, f"{name}: parameter {key} gets a gradient padded but none {layout}"
        bound = rounding_tolerance(ITEM_SCALE * n * float(g.abs().max()) + 1e-12, LOGPROB_ROUNDINGS + int(n))
        diff = float((g - other).abs().max())
        assert diff <= bound, f"{name}: gradient of {key} differs by {diff:.2e} {layout} (allowed {bound:.1e})"


def check_padding_free_auto(method_class, rows, model_dir, overrides, rewards=None) -> None:
    """``padding_free: "auto"`` is decided per forward by :func:`posttrain.models.pack_batch` and is exact: with
    the layouts' cost estimate forced to favour packing, every forward of the policy in ``loss`` gets one (1, N)
    row; forced to favour padding, none does; both give the padded micro-batch's loss sum, item count and gradients
    (the tiny model under sdpa, whose ``auto`` is a choice per micro-batch).

    .. versionadded:: 1.0
    """
    from unittest import mock

    from posttrain import models

    name = method_class.name
    padded = _loss_and_grads(method_class, rows, model_dir, overrides, rewards, padding_free=False)
    runs = {}
    for favoured, costs in (("packed", (1.0, 0.0)), ("padded", (0.0, 1.0))):  # (padded, packed) estimates
        with mock.patch.object(models, "_layout_costs", lambda config, lengths, width, c=costs: c):
            runs[favoured] = _loss_and_grads(method_class, rows, model_dir, overrides, rewards, padding_free="auto")
    widths = runs["packed"][3]
    assert widths and all(w == 1 for w in widths), (
        f"{name}: with padding_free auto and packing estimated cheaper the model's forwards in loss got batches of "
        f"{widths} rows; ask posttrain.models.pack_batch(model, resolved, attention_mask) for every forward"
    )
    widths = runs["padded"][3]
    assert widths and all(w > 1 for w in widths), (
        f"{name}: with padding_free auto and padding estimated cheaper the model's forwards in loss got batches of "
        f"{widths} rows; auto must follow posttrain.models.pack_batch, which said padded"
    )
    for favoured, run in runs.items():
        _assert_same_loss_and_grads(name, padded, run, f"under auto ({favoured} chosen)")


class _IgnoresPositions:
    """A model whose forward drops ``position_ids``, so sequences packed in a row attend to each other (its class
    takes the wrapped model's name, so a method's checks of the model class in ``setup`` pass)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.config = inner, inner.config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, position_ids: Any = None, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def check_padding_free_refused(method_class, rows, model_dir, overrides, rewards=None) -> None:
    """``setup`` refuses ``padding_free: true`` with a model that lets packed sequences see each other
    (:func:`posttrain.models.check_packed_attention`), naming the option.

    .. versionadded:: 1.0
    """
    import pytest

    from posttrain import ConfigError

    _, model, ctx, _ = _live_method(
        method_class, rows, model_dir, {**overrides, "padding_free": False}, training=True, rewards=rewards
    )
    config = dataclasses.replace(ctx.config, padding_free=True)
    wrapper = type(type(model).__name__, (_IgnoresPositions,), {})
    leaky = dataclasses.replace(ctx, config=config, model=wrapper(model))
    with pytest.raises(ConfigError, match="padding_free"):
        method_class().setup(leaky)


def check_resume(method_class, rows, model_dir, tmp_path, overrides, rewards=None, atol=1e-6) -> None:
    """Resuming from the step-2 checkpoint reproduces the uninterrupted run's losses and final weights.

    .. versionadded:: 0.1
    """
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
    """The same seed gives the same losses and bit-identical weights.

    .. versionadded:: 0.1
    """
    outs = []
    for i in range(2):
        config = _config(method_class, model_dir, tmp_path / f"det-{i}", overrides, max_steps=2)
        outs.append((_losses(_train(method_class, rows, config, rewards)), config.output_dir))
    assert outs[0][0] == outs[1][0], f"{method_class.name}: same seed, different losses {outs[0][0]} vs {outs[1][0]}"
    diff, name = _max_weight_diff(_weights(outs[0][1]), _weights(outs[1][1]))
    assert diff == 0.0, f"{method_class.name}: same seed, weights differ by {diff:.2e} (parameter {name})"


def check_prepare_cached(method_class: Any, rows: list[dict], model_dir: Path, tmp_path: Path, overrides: dict) -> None:
    """A method that declares ``prepare_cacheable``: ``prepare`` needs no model and no ``setup`` (a cached run skips
    neither, but the rows must not depend on them), gives equal rows twice, and they read back equal from an entry.

    .. versionadded:: 1.1
    """
    import datasets

    from posttrain import _prepare_cache
    from posttrain._method import TrainContext
    from posttrain.models import load_tokenizer

    name = method_class.name
    config = _config(method_class, model_dir, tmp_path / "out-cache", overrides)
    tokenizer = load_tokenizer(str(model_dir))
    prepared = []
    for _ in range(2):
        ctx = TrainContext(config=config, tokenizer=tokenizer)  # no model: prepare must not read one
        try:
            prepared.append(method_class().prepare(datasets.Dataset.from_list(copy.deepcopy(rows)), ctx))
        except AttributeError as exc:
            raise AssertionError(
                f"{name}: declares prepare_cacheable, but prepare failed without a model or setup ({exc}); its rows "
                "may come from the cache of another run, so they must depend only on the rows, the tokenizer and the "
                "config. Move model-computed values to precompute(rows, ctx), or drop prepare_cacheable."
            ) from exc
    assert prepared[0] == prepared[1], f"{name}: prepare gave different rows twice on the same input"
    entry = _prepare_cache.Entry(tmp_path / "prepare-cache", "0" * 64, {})
    why = _prepare_cache.store(entry, list(prepared[0]), [], True)
    assert why == "", f"{name}: declares prepare_cacheable, but its rows cannot be cached: {why}"
    back = _prepare_cache.load(entry)
    assert back is not None and back[0] == prepared[0], f"{name}: prepared rows differ after a cache round trip"


def check_reference_frozen(method_class, rows, model_dir, overrides, rewards=None, peft: bool | None = None) -> None:
    """No module the method keeps beside the policy receives a gradient or changes over a training step.

    The modules checked are every ``torch.nn.Module`` among the method's attributes (``self.ref_model``, a
    teacher, a reward model; in dicts and lists too) and in ``ctx.state``, after ``setup``; under LoRA also
    the policy's own frozen base weights, which are the reference when adapters are disabled. One micro-batch
    goes through ``rollout`` and ``loss`` (the policy first moved a little off the reference, where a KL term's
    gradient would vanish), ``loss_sum`` is back-propagated and the policy's trainable parameters take an SGD
    step: a checked parameter shared with the policy, holding a gradient, or changed
    fails the check, naming it. ``peft`` (default: when peft is installed) repeats the check with
    ``use_peft=True``.

    .. versionadded:: 1.0
    """
    import importlib.util

    if peft is None:
        peft = importlib.util.find_spec("peft") is not None
    for use_peft in (False, True) if peft else (False,):
        _check_frozen_once(method_class, rows, model_dir, {**overrides, "use_peft": use_peft}, rewards)


def _check_frozen_once(method_class, rows, model_dir, overrides, rewards) -> None:
    import torch

    from posttrain._method import optional_member
    from posttrain.models import is_peft_model

    method, model, ctx, prepared = _live_method(
        method_class, rows, model_dir, overrides, training=True, rewards=rewards
    )
    # move the policy off the reference first: where the two agree, a KL penalty's gradient (GRPO's k3 estimate)
    # is exactly 0 with respect to both, so a reference left open to gradients would go unnoticed
    _perturb(model)
    label = f"{method_class.name}{' (use_peft=True)' if overrides.get('use_peft') else ''}"
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    storages = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters() if p.requires_grad}
    frozen: dict[str, torch.nn.Parameter] = {}
    for where, module in _kept_modules(method, ctx, model).items():
        for name, p in module.named_parameters():
            shared = trainable.get(id(p)) or storages.get(p.untyped_storage().data_ptr())
            assert shared is None, (
                f"{label}: {where} shares parameter {name!r} with the policy ({shared}), so it changes as the policy "
                "trains: a reference must be a separate, frozen copy, e.g. posttrain.models.reference_model(ctx) "
                "in setup (not ctx.model itself)"
            )
            frozen[f"{where}.{name}"] = p
    if is_peft_model(model):
        frozen.update({f"policy base weight {n}": p for n, p in model.named_parameters() if not p.requires_grad})
    if not frozen:
        return  # nothing kept beside the policy: nothing that could move
    before = {n: p.detach().clone() for n, p in frozen.items()}
    batch = method.collate(list(prepared[:4]), ctx)
    rollout = optional_member(method, "rollout")
    if rollout:
        with torch.no_grad():
            batch = rollout(model, [batch], ctx)[0]
    method.loss(model, batch, ctx).loss_sum.backward()
    got_grad = {n: float(p.grad.abs().max()) for n, p in frozen.items() if p.grad is not None and bool(p.grad.any())}
    assert not got_grad, (
        f"{label}: gradients flow into the reference model: {len(got_grad)} frozen parameters received a gradient "
        f"(e.g. {next(iter(got_grad))}, max |grad| {max(got_grad.values()):.3g}). Compute reference outputs under "
        "torch.no_grad() (posttrain.models.reference_forward does) and freeze the module with requires_grad_(False) "
        "(posttrain.models.reference_model does); otherwise every step spends memory on the reference's gradients "
        "and anything that steps them moves the reference"
    )
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    torch.optim.SGD(params, lr=0.1).step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in frozen.items() if not torch.equal(p, before[n])}
    assert not moved, (
        f"{label}: the reference model changed over one training step: {len(moved)} frozen parameters moved (e.g. "
        f"{next(iter(moved))} by {max(moved.values()):.3g}); it must stay the model training started from"
    )


def _kept_modules(method: Any, ctx: Any, policy: Any) -> dict[str, Any]:
    """Every torch module the method keeps beside the policy: in its attributes and ctx.state, one level deep."""
    import torch

    found: dict[str, Any] = {}

    def visit(where: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.nn.Module):
            is_policy = value is policy or getattr(value, "module", None) is policy
            if not is_policy:
                found[where] = value
            elif "ref" in where.lower():  # keeping the policy itself is fine, calling it the reference is not
                raise AssertionError(
                    f"{where} is the policy model itself, so the reference moves with every step: load a frozen "
                    "copy with posttrain.models.reference_model(ctx) in setup"
                )
        elif depth < 1 and isinstance(value, dict):
            for key, item in value.items():
                visit(f"{where}[{key!r}]", item, depth + 1)
        elif depth < 1 and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{where}[{i}]", item, depth + 1)

    for name, value in vars(method).items():
        visit(f"method.{name}", value, 0)
    for name, value in ctx.state.items():
        visit(f"ctx.state[{name!r}]", value, 0)
    return found


def check_batch_unchanged(method_class, rows, model_dir, overrides, rewards=None) -> None:
    """``rollout`` and ``loss`` leave the batch they are given as it was: no tensor edited in place, no entry
    replaced or removed (and ``loss`` adds none).

    The loop hands the same batch to ``loss`` again when a rolled-out batch is reused (``batch_reuse``), and
    evaluation and the kit's probes call ``loss`` several times on one batch: an in-place edit (a masked
    ``attention_mask``, a shifted ``input_ids``) then changes what the next call sees.

    .. versionadded:: 1.0
    """
    import torch

    from posttrain._method import optional_member

    method, model, ctx, prepared = _live_method(
        method_class, rows, model_dir, overrides, training=True, rewards=rewards
    )
    batch = method.collate(list(prepared[:4]), ctx)
    rollout = optional_member(method, "rollout")
    if rollout:
        before = _snapshot(batch)
        with torch.no_grad():
            rolled = rollout(model, [batch], ctx)[0]
        changes = _changes(before, batch, "batch", allow_new_keys=True)
        assert not changes, f"{method_class.name}: rollout changed the batch it was given: " + "; ".join(changes)
        batch = rolled
    before = _snapshot(batch)
    method.loss(model, batch, ctx)
    changes = _changes(before, batch, "batch", allow_new_keys=False)
    assert not changes, (
        f"{method_class.name}: loss changed the batch it was given: "
        + "; ".join(changes)
        + ". Work on a copy (mask = batch['attention_mask'].clone(), or an out-of-place op such as masked_fill)"
    )


def _snapshot(value: Any) -> Any:
    """(the object, a deep copy of its contents) for every tensor, dict and list in ``value``."""
    import torch

    if isinstance(value, torch.Tensor):
        return (value, value.detach().clone())
    if isinstance(value, dict):
        return (value, {k: _snapshot(v) for k, v in value.items()})
    if isinstance(value, list):
        return (value, [_snapshot(v) for v in value])
    return (value, copy.copy(value))


def _changes(snapshot: Any, now: Any, where: str, allow_new_keys: bool) -> list[str]:
    import torch

    original, contents = snapshot
    if now is not original:
        return [f"{where} was replaced by another object"]
    if isinstance(original, torch.Tensor):
        if original.shape != contents.shape or original.dtype != contents.dtype:
            return [f"{where} changed shape or dtype in place ({tuple(contents.shape)} -> {tuple(original.shape)})"]
        if not torch.equal(original.detach(), contents):
            n = int((original.detach() != contents).sum())
            return [f"{where} was changed in place ({n} of {original.numel()} values differ)"]
        return []
    out = []
    if isinstance(original, dict):
        for key, item in contents.items():
            if key not in original:
                out.append(f"{where}[{key!r}] was removed")
            else:
                out += _changes(item, original[key], f"{where}[{key!r}]", allow_new_keys)
        added = [k for k in original if k not in contents]
        if added and not allow_new_keys:
            out.append(f"{where} gained the entries {added}")
    elif isinstance(original, list):
        if len(original) != len(contents):
            return [f"{where} changed length ({len(contents)} -> {len(original)})"]
        for i, item in enumerate(contents):
            out += _changes(item, original[i], f"{where}[{i}]", allow_new_keys)
    return out


# -- image checks (methods that declare supports_images) ------------------------------------------------------


def default_image_rows(method_class: Any, n: int = 12) -> list[dict]:
    """Rows with synthetic images in the first of the method's dataset formats the colour task can write.

    .. versionadded:: 1.0
    """
    from posttrain.testing.vision_task import colour_rows

    supported = ("prompt_completion", "language_modeling", "preference", "prompt_only")
    fmt = next((f for f in method_class.dataset_formats if f in supported), None)
    if fmt is None:
        raise ValueError(
            f"{method_class.name} declares supports_images but its formats {method_class.dataset_formats} are none of "
            f"{supported}, which posttrain.testing.colour_rows writes; pass image_rows= to conformance_suite"
        )
    return colour_rows(n, fmt, seed=0)


def check_images_reach_model(method_class, rows, model_dir, overrides, rewards=None) -> None:
    """The images of a batch reach the model: the same rows with other images give another loss.

    Every image is replaced by its colour-inverted copy (same size, so the same tokens); a method that drops the
    pixel values, or a model that never sees them, gives the same ``loss_sum`` twice. For an online method (one
    with ``rollout``) the images also change what is sampled, so the loss or the item count must differ.

    .. versionadded:: 1.0
    """
    from PIL import ImageOps

    from posttrain.vision import load_image

    def inverted(row: dict) -> dict:
        out = dict(row)
        for column in ("images", "image"):
            value = row.get(column)
            if isinstance(value, list):
                out[column] = [ImageOps.invert(load_image(v)) for v in value]
            elif value is not None:
                out[column] = ImageOps.invert(load_image(value))
        return out

    losses = []
    for variant in (rows, [inverted(r) for r in rows]):
        method, model, ctx, prepared = _live_method(
            method_class, variant, model_dir, overrides, training=False, rewards=rewards
        )
        model.eval()
        _perturb(model)
        losses.append(_loss_of(method, model, ctx, list(prepared[:4])))
    (plain, n_plain), (other, n_other) = losses
    from posttrain._method import optional_member

    if optional_member(method_class(), "rollout") is not None:  # images change what is sampled, so the count too
        assert (plain, n_plain) != (other, n_other), (
            f"{method_class.name}: the loss is {plain:.6g} over {n_plain:g} items with the rows' images and with "
            "inverted images alike: the images reach neither the generator nor the loss. Hand them to "
            "posttrain.generation.sample (collate_prompts keeps them) and pass Rollout.model_inputs to the forward"
        )
        return
    assert n_plain == n_other, (
        f"{method_class.name}: replacing the images by inverted copies (same sizes) changes n_items from {n_plain:g} "
        f"to {n_other:g}; the tokens of a row must not depend on its pixels"
    )
    assert not _close_to(plain, other, rtol=1e-7), (
        f"{method_class.name}: the loss is {plain:.6g} with the rows' images and {other:.6g} with inverted images: the "
        "images do not reach the model. Add the processor's image tensors to the batch in collate "
        "(posttrain.vision.image_inputs) and pass them to the forward (posttrain.vision.model_inputs)"
    )


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
    image_rows: list[dict] | None = None,
) -> type:
    """A pytest test class with one test per check. ``method`` is an installed name (or a class).

    Args:
        rows: at least :data:`MIN_ROWS` (8) raw rows in the method's dataset format.
        config: method config overrides for the tiny runs (``max_length``, ``beta``, ...).
        tier: "api" or "full".
        xfail: check name -> reason, for checks that cannot hold for this method (strict xfail).
        rewards: reward functions by name, for online methods.
        model_kwargs: passed to ``build_tiny_model`` (architecture, hidden_size, ...).
        progress_metric: what "learning" means for the loss_decreases check (e.g. ``"reward"`` for online RL).
        progress_direction: ``"decrease"`` or ``"increase"``.
        progress_steps: training steps of the loss_decreases check.
        batch_unit: items per dataset row when a row expands into several (an online method's
            ``num_generations``): batch sizes the checks use are multiples of it.
        image_rows: rows with images for the image checks (tier full, methods that declare
            ``supports_images``); default :func:`default_image_rows`.

    .. versionadded:: 0.1
    .. versionchanged:: 1.0 tier full adds ``reference_frozen`` and ``batch_unchanged``; ``batch_unit``.
    .. versionchanged:: 1.0 the image checks and ``image_rows``.
    .. versionchanged:: 1.0 the padding-free checks.
    """
    import pytest

    if tier not in ("api", "full"):
        raise ValueError(f"tier must be 'api' or 'full', got {tier!r}")
    if len(rows) < MIN_ROWS:
        raise ValueError(
            f"conformance_suite needs at least {MIN_ROWS} rows (one optimizer step of batch 4, twice), got {len(rows)}; "
            "add rows in the method's dataset format"
        )
    xfail = dict(xfail or {})
    every = API_CHECKS + FULL_CHECKS + IMAGE_CHECKS + PADDING_FREE_CHECKS + PREPARE_CACHE_CHECKS
    unknown = set(xfail) - set(every)
    if unknown:
        raise ValueError(f"unknown checks in xfail: {sorted(unknown)}; checks are {every}")
    overrides = {"per_device_train_batch_size": 4 * batch_unit, "per_device_eval_batch_size": 4 * batch_unit}
    overrides.update(config or {})
    label = method if isinstance(method, str) else getattr(method, "name", str(method))
    _stats["suites"] += 1

    def _model_dir(cls, tmp_path_factory):
        return tiny_model(tmp_path_factory.mktemp(f"kit-{label}") / "model", **(model_kwargs or {}))

    model_dir = pytest.fixture(scope="class", name="model_dir")(classmethod(_model_dir))

    def _vlm_dir(cls, tmp_path_factory):
        from posttrain.testing.vision_task import build_tiny_vlm

        return build_tiny_vlm(tmp_path_factory.mktemp(f"kit-{label}-vlm") / "model")

    vlm_dir = pytest.fixture(scope="class", name="vlm_dir")(classmethod(_vlm_dir))
    with_images = tier == "full" and getattr(_resolve(method)[0], "supports_images", False) is True
    with_padding_free = tier == "full" and getattr(_resolve(method)[0], "supports_padding_free", False) is True
    with_cache = tier == "full" and getattr(_resolve(method)[0], "prepare_cacheable", False) is True
    images: dict[str, list[dict]] = {}

    def image_rows_of(method_class: Any) -> list[dict]:  # made on first use: drawing images costs time
        if "rows" not in images:
            images["rows"] = image_rows if image_rows is not None else default_image_rows(method_class)
        return images["rows"]

    def resolved():
        return _resolve(method)[0]

    def distribution():
        entry = _resolve(method)[1]
        return entry.package if entry is not None else None

    checks = {
        "metadata": lambda self, model_dir, tmp_path: (
            check_metadata(label)
            if isinstance(method, str)
            else pytest.skip("method given as a class: no installed metadata to check")
        ),
        "protocol": lambda self, model_dir, tmp_path: check_protocol(resolved(), distribution()),
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
            resolved(), rows, model_dir, overrides, rewards=rewards
        ),
        "resume": lambda self, model_dir, tmp_path: check_resume(
            resolved(), rows, model_dir, tmp_path, overrides, rewards
        ),
        "determinism": lambda self, model_dir, tmp_path: check_determinism(
            resolved(), rows, model_dir, tmp_path, overrides, rewards
        ),
        "reference_frozen": lambda self, model_dir, tmp_path: check_reference_frozen(
            resolved(), rows, model_dir, overrides, rewards
        ),
        "batch_unchanged": lambda self, model_dir, tmp_path: check_batch_unchanged(
            resolved(), rows, model_dir, overrides, rewards
        ),
        "images_reach_model": lambda self, vlm_dir, tmp_path: check_images_reach_model(
            resolved(), image_rows_of(resolved()), vlm_dir, overrides, rewards
        ),
        "image_grad_accumulation": lambda self, vlm_dir, tmp_path: check_grad_accumulation(
            resolved(), image_rows_of(resolved()), vlm_dir, tmp_path, overrides, rewards, batch_unit=batch_unit
        ),
        "image_padding_invariance": lambda self, vlm_dir, tmp_path: check_padding_invariance(
            resolved(), image_rows_of(resolved()), vlm_dir, overrides, rewards=rewards
        ),
        "padding_free": lambda self, model_dir, tmp_path: check_padding_free(
            resolved(), rows, model_dir, overrides, rewards
        ),
        "padding_free_auto": lambda self, model_dir, tmp_path: check_padding_free_auto(
            resolved(), rows, model_dir, overrides, rewards
        ),
        "padding_free_refused": lambda self, model_dir, tmp_path: check_padding_free_refused(
            resolved(), rows, model_dir, overrides, rewards
        ),
        "prepare_cached": lambda self, model_dir, tmp_path: check_prepare_cached(
            resolved(), rows, model_dir, tmp_path, overrides
        ),
    }
    names = API_CHECKS + (FULL_CHECKS if tier == "full" else ()) + (IMAGE_CHECKS if with_images else ())
    names += PADDING_FREE_CHECKS if with_padding_free else ()
    names += PREPARE_CACHE_CHECKS if with_cache else ()
    namespace: dict[str, Any] = {
        "model_dir": model_dir,
        "vlm_dir": vlm_dir,
        "__doc__": f"posttrain conformance kit, tier {tier}, for {label}",
    }
    for name in names:
        func = checks[name]

        if name in IMAGE_CHECKS:

            def test(self, vlm_dir, tmp_path, _func=func):
                _func(self, vlm_dir, tmp_path)

        else:

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


_own_cache: list[str] = []  # the prepared-data cache directory this process made for the session


def pytest_configure(config):
    import os
    import tempfile

    config.addinivalue_line("markers", "posttrain_conformance: a posttrain conformance-kit check")
    # runs under test write their prepared-data cache to a directory of the session, never the user's cache
    # (subprocesses inherit it; so do pytest-xdist workers, which then share it: entries are written atomically)
    if not os.environ.get("POSTTRAIN_CACHE"):
        _own_cache.append(tempfile.mkdtemp(prefix="posttrain-test-cache-"))
        os.environ["POSTTRAIN_CACHE"] = _own_cache[0]


def pytest_unconfigure(config):
    import os

    for path in _own_cache:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get("POSTTRAIN_CACHE") == path:
            del os.environ["POSTTRAIN_CACHE"]
    _own_cache.clear()


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
