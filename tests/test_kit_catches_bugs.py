"""The conformance kit catches the classic bugs, and says which one it found.

Each test generates a package from a template (``posttrain new``), plants one bug by editing a line of
its source, imports it straight from ``src/`` (no install) and runs the one full-tier check that bug
breaks: the check must fail, and its message must name the bug. The clean package of every template
passes every full-tier check. A package name per variant keeps the imports apart.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from posttrain._lifecycle import scaffold
from posttrain.testing import kit

LM_ROWS = [{"text": ("abc " * (1 + i % 5)) + f"row {i}."} for i in range(8)]
WORDS = ["cat", "dog", "sun", "map", "red", "tea", "box", "owl"]
PREFERENCE_ROWS = [
    {"prompt": f"Say {w}:", "chosen": f" {w * (1 + i % 3)}", "rejected": f" {w[::-1]}"} for i, w in enumerate(WORDS)
]
# prompts of different lengths; sampled per prompt under a seed of (seed, step, row), so probes compare exactly
ONLINE_ROWS = [{"prompt": f"{a}+{b}=" + " " * (a % 3), "answer": str(a + b)} for a in range(4) for b in range(4)]
ROWS = {"lm": LM_ROWS, "preference": PREFERENCE_ROWS, "online": ONLINE_ROWS}
CONFIG = {
    "lm": {"max_length": 32},
    "preference": {"max_length": 32, "beta": 0.1},
    "online": {
        "reward_funcs": ["answer"],
        "reward_kwargs": {"answer": {"format_credit": 1.0}},
        "num_generations": 4,
        "per_prompt_generation": True,
        "max_completion_length": 8,
        "learning_rate": 5e-2,
        "beta": 0.04,
        "top_k": 50,
        "generation_kwargs": {"sequence_bias": [[[1], 3.0]]},  # EOS (token 1) bias: completions of varied lengths
        "per_device_train_batch_size": 16,  # the kit's batch sizes count completions: 4 prompts x 4
        "per_device_eval_batch_size": 16,
    },
}
BATCH_UNIT = {
    "online": 4
}  # items per row: an online method's batch sizes count completions, num_generations per prompt
PROGRESS = {"online": ("reward", "increase")}  # what learning means for the loss_decreases check, if not the loss

# template -> bug -> (file under src/<package>/, the line as generated, the line with the bug)
BUGS = {
    "lm": {
        "mean": (
            "loss.py",
            "    loss_sum = -(logps * mask).sum()",
            "    loss_sum = -(logps * mask).sum() / mask.sum()",
        ),
        "padding": (
            "method.py",
            'shift_for_causal_lm(out.logits, batch["input_ids"], batch["attention_mask"])',
            'shift_for_causal_lm(out.logits, batch["input_ids"], torch.ones_like(batch["attention_mask"]))',
        ),
        "mask_in_place": (
            "method.py",
            "        out = model(",
            '        batch["attention_mask"][:, 0] = 0  # "never score the first token"\n        out = model(',
        ),
    },
    "preference": {
        "mean": ("loss.py", "return losses.sum(), losses.numel()", "return losses.mean(), losses.numel()"),
        "padding": ("data.py", "completion_mask[i, len(prompt) : n] = 1", "completion_mask[i, len(prompt) :] = 1"),
        "mask_in_place": (
            "method.py",
            '        inputs = (batch["input_ids"]',
            '        batch["attention_mask"].mul_(batch["attention_mask"].flip(1))\n        inputs = (batch["input_ids"]',
        ),
        "reference_gradients": (
            "method.py",
            "with reference_forward(model, self.ref_model) as ref:",
            "with __import__('contextlib').nullcontext(self.ref_model.requires_grad_(True)) as ref:",
        ),
    },
    "online": {
        "mean": (
            "loss.py",
            "    loss_sum = (per_token * mask).sum()",
            "    loss_sum = (per_token * mask).sum() / mask.sum()",
        ),
        "padding": (
            "method.py",
            'mask = batch["completion_mask"]  # (N, C)',
            'mask = torch.ones_like(batch["completion_mask"])',
        ),
        "mask_in_place": (
            "method.py",
            "        inputs = (batch[",
            '        batch["attention_mask"][:, -1] = 0  # "never attend to the last position"\n        inputs = (batch[',
        ),
        "reference_gradients": (
            "method.py",
            "with reference_forward(model, self.ref_model) as ref:",
            "with __import__('contextlib').nullcontext(self.ref_model.requires_grad_(True)) as ref:",
        ),
    },
}
# which check each bug breaks, and what its message must say
EXPECTED = {
    "mean": ("grad_accumulation", "loss returns a mean, not a sum"),
    "padding": ("padding_invariance", "pad"),
    "mask_in_place": ("batch_unchanged", "batch['attention_mask'] was changed in place"),
    "reference_gradients": ("reference_frozen", "gradients flow into the reference model"),
}
CASES = [(template, bug) for template, bugs in BUGS.items() for bug in bugs]


def load_package(tmp_path: Path, template: str, tag: str, bug: str | None = None):
    """Generate ``template`` as a package named after ``tag``, plant ``bug``, import its method class."""
    name = f"kitbug-{template}-{tag}".replace("_", "-")
    root = scaffold.generate(name, tmp_path / name, author="", core_version="1.0", template=template)
    n = scaffold.names(name)
    if bug is not None:
        file, line, planted = BUGS[template][bug]
        path = root / "src" / n.package / file
        text = path.read_text()
        assert text.count(line) == 1, f"the {template} template changed: {line!r} is not in {file} exactly once"
        text = text.replace(line, planted)
        if "torch.ones_like" in planted and "import torch" not in text:
            text = text.replace("from posttrain import", "import torch\nfrom posttrain import", 1)
        path.write_text(text)
    sys.path.insert(0, str(root / "src"))
    try:
        module = importlib.import_module(n.package)
    finally:
        sys.path.remove(str(root / "src"))
    return getattr(module, n.class_name)


def rewards_of(template: str, method_class) -> dict | None:
    """The online template's example reward, from the generated package itself (nothing is installed)."""
    if template != "online":
        return None
    package = importlib.import_module(method_class.__module__.rpartition(".")[0])
    return {"answer": package.answer_reward}


def run_check(check: str, method_class, template: str, model_dir: Path, tmp_path: Path) -> None:
    rows, config, rewards = ROWS[template], CONFIG[template], rewards_of(template, method_class)
    if check == "grad_accumulation":
        unit = BATCH_UNIT.get(template, 1)
        kit.check_grad_accumulation(method_class, rows, model_dir, tmp_path, config, rewards, batch_unit=unit)
    elif check == "padding_invariance":
        kit.check_padding_invariance(method_class, rows, model_dir, config, rewards=rewards)
    elif check == "batch_unchanged":
        kit.check_batch_unchanged(method_class, rows, model_dir, config, rewards)
    elif check == "reference_frozen":
        kit.check_reference_frozen(method_class, rows, model_dir, config, rewards, peft=False)
    else:
        raise AssertionError(check)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return kit.tiny_model(tmp_path_factory.mktemp("kit-bugs") / "model")


@pytest.mark.parametrize(("template", "bug"), CASES, ids=[f"{t}-{b}" for t, b in CASES])
def test_a_planted_bug_fails_its_check_with_a_message_naming_it(template, bug, model_dir, tmp_path):
    check, phrase = EXPECTED[bug]
    method_class = load_package(tmp_path, template, bug, bug)
    with pytest.raises(AssertionError) as failure:
        run_check(check, method_class, template, model_dir, tmp_path)
    assert phrase in str(failure.value), f"{check} failed for the wrong reason:\n{failure.value}"


@pytest.mark.parametrize("template", list(BUGS))
def test_a_mean_is_not_blamed_on_padding(template, model_dir, tmp_path):
    """The padding check used to say "padding changes the loss" for a loss that returns a mean."""
    method_class = load_package(tmp_path, template, "mean-pad", "mean")
    with pytest.raises(AssertionError) as failure:
        kit.check_padding_invariance(
            method_class, ROWS[template], model_dir, CONFIG[template], rewards=rewards_of(template, method_class)
        )
    assert "loss returns a mean, not a sum" in str(failure.value)
    assert "padded positions are scored" not in str(failure.value)


@pytest.mark.parametrize("template", list(BUGS))
def test_padding_is_not_blamed_on_a_mean(template, model_dir, tmp_path):
    method_class = load_package(tmp_path, template, "pad-ga", "padding")
    with pytest.raises(AssertionError) as failure:
        kit.check_grad_accumulation(
            method_class,
            ROWS[template],
            model_dir,
            tmp_path,
            CONFIG[template],
            rewards_of(template, method_class),
            batch_unit=BATCH_UNIT.get(template, 1),
        )
    assert "pad" in str(failure.value) and "returns a mean" not in str(failure.value)


@pytest.mark.slow
@pytest.mark.parametrize("template", list(BUGS))
def test_the_clean_package_passes_the_full_tier(template, model_dir, tmp_path):
    method_class = load_package(tmp_path, template, "clean")
    rows, config, rewards = ROWS[template], CONFIG[template], rewards_of(template, method_class)
    metric, direction = PROGRESS.get(template, ("loss", "decrease"))
    kit.check_protocol(method_class)
    kit.check_loss_decreases(
        method_class, rows, model_dir, tmp_path, config, rewards, metric=metric, direction=direction
    )
    for check in ("grad_accumulation", "padding_invariance", "batch_unchanged", "reference_frozen"):
        run_check(check, method_class, template, model_dir, tmp_path)
    kit.check_reference_frozen(method_class, rows, model_dir, config, rewards, peft=True)
    kit.check_resume(method_class, rows, model_dir, tmp_path, config, rewards)
    kit.check_determinism(method_class, rows, model_dir, tmp_path, config, rewards)
