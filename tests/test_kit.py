"""posttrain.testing.kit: the protocol check's near misses and hooks, and the reference and batch checks.

The end-to-end cases (a generated package with a planted bug) are in test_kit_catches_bugs.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from posttrain.testing import kit


def test_protocol_names_a_near_miss_optional_member(toy_module):
    class Typo(toy_module.Toy):
        def rolout(self, model, batch, ctx):
            return batch

    with pytest.raises(AssertionError, match=r"defines 'rolout'.*did you mean 'rollout'"):
        kit.check_protocol(Typo)


def test_protocol_names_a_wrong_signature(toy_module):
    class TwoArguments(toy_module.Toy):
        def rollout(self, model, batch):
            return batch

    with pytest.raises(AssertionError, match=r"rollout\(model, batch\) does not match the protocol"):
        kit.check_protocol(TwoArguments)


def test_protocol_checks_members_set_on_the_instance(toy_module):
    class Assigned(toy_module.Toy):
        def __init__(self):
            self.setup = lambda: None  # the loop calls setup(ctx)

    with pytest.raises(AssertionError, match="setup"):
        kit.check_protocol(Assigned)


PLUGIN_WITH_A_BAD_CALLBACK = """
from posttrain import hookimpl


class Logger:
    def on_logs(self, ctx, metrics):
        pass

    def on_save(self, ctx):
        pass


@hookimpl
def posttrain_add_callbacks(registry, config):
    if "kitlog" in config.report_to:  # added only when asked for, as loggers are
        registry.add(Logger())
"""

PLUGIN_WITH_A_MISSPELLED_HOOK = """
from posttrain import hookimpl


@hookimpl
def posttrain_add_callback(registry, config):
    pass
"""


def test_protocol_checks_the_callbacks_a_package_registers(fake_site, toy_module):
    fake_site.add(
        "posttrain-kitlog",
        methods={"kitlog": "posttrain_toy_method:Toy"},
        plugins={"kitlog": "kitlog_hooks"},
        module="kitlog_hooks",
        code=PLUGIN_WITH_A_BAD_CALLBACK,
    )
    with pytest.raises(AssertionError) as failure:
        kit.check_protocol(toy_module.Toy, "posttrain-kitlog")
    message = str(failure.value)
    assert "defines 'on_logs', which is not a callback event" in message and "did you mean 'on_log'" in message
    assert "on_save(ctx) does not match the protocol" in message


def test_protocol_names_a_misspelled_hook(fake_site, toy_module):
    fake_site.add(
        "posttrain-kithook",
        methods={"kithook": "posttrain_toy_method:Toy"},
        plugins={"kithook": "kithook_hooks"},
        module="kithook_hooks",
        code=PLUGIN_WITH_A_MISSPELLED_HOOK,
    )
    with pytest.raises(AssertionError, match="did you mean 'posttrain_add_callbacks'"):
        kit.check_protocol(toy_module.Toy, "posttrain-kithook")


def test_protocol_passes_a_package_without_hooks(fake_site, toy_module):
    fake_site.add("posttrain-kitplain", methods={"kitplain": "posttrain_toy_method:Toy"})
    kit.check_protocol(toy_module.Toy, "posttrain-kitplain")


def with_reference(toy_module, make_reference):
    class WithReference(toy_module.Toy):
        def setup(self, ctx):
            self.ref_model = make_reference(ctx.model)

    return WithReference


@pytest.mark.parametrize(
    ("make_reference", "message"),
    [
        (lambda policy: policy, "is the policy model itself"),
        (copy.copy, "shares parameter"),
    ],
    ids=["the-policy", "a-shallow-copy"],
)
def test_reference_that_moves_with_the_policy(toy_module, tiny_model_dir, toy_rows, make_reference, message):
    method_class = with_reference(toy_module, make_reference)
    with pytest.raises(AssertionError, match=message):
        kit.check_reference_frozen(method_class, toy_rows[:8], tiny_model_dir, {"max_length": 32}, peft=False)


def test_a_frozen_deep_copy_passes(toy_module, tiny_model_dir, toy_rows):
    def frozen(policy):
        return copy.deepcopy(policy).requires_grad_(False)

    method_class = with_reference(toy_module, frozen)
    kit.check_reference_frozen(method_class, toy_rows[:8], tiny_model_dir, {"max_length": 32}, peft=False)


def test_batch_changes_are_named():
    mask = torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask, "meta": [1, 2]}
    before = kit._snapshot(batch)
    assert kit._changes(before, batch, "batch", allow_new_keys=False) == []
    mask[0, 0] = 0
    batch["input_ids"] = batch["input_ids"] + 1
    batch["extra"] = 1
    batch["meta"].append(3)
    changes = kit._changes(before, batch, "batch", allow_new_keys=False)
    assert "batch['attention_mask'] was changed in place (1 of 6 values differ)" in changes
    assert "batch['input_ids'] was replaced by another object" in changes
    assert "batch['meta'] changed length (2 -> 3)" in changes
    assert "batch gained the entries ['extra']" in changes
    assert not any("gained" in c for c in kit._changes(before, batch, "batch", allow_new_keys=True))


def test_min_rows_is_what_the_suite_enforces():
    with pytest.raises(ValueError, match=f"at least {kit.MIN_ROWS} rows"):
        kit.conformance_suite("x", rows=[{"text": "a"}] * (kit.MIN_ROWS - 1))
