"""Hooks: documented, and throwaway plugins registering methods, rewards and callbacks."""

from __future__ import annotations

import inspect
import warnings

import pytest
from posttrain import _registry as registry
from posttrain import hookspecs
from posttrain._errors import PluginError


def hook_functions():
    return [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("posttrain_")]


def test_every_hook_is_documented_with_an_example():
    hooks = hook_functions()
    assert {h.__name__ for h in hooks} >= {
        "posttrain_register_methods",
        "posttrain_register_rewards",
        "posttrain_add_callbacks",
    }
    for hook in hooks:
        doc = inspect.getdoc(hook)
        assert "Example::" in doc and ":param" in doc and "versionadded" in doc, hook.__name__


def test_hookimpl_is_exported():
    import posttrain

    assert posttrain.hookimpl is hookspecs.hookimpl


@pytest.fixture
def pm():
    manager = registry.plugin_manager(load_entry_points=False)
    yield manager
    registry.reset_plugin_manager()


def test_register_method_through_hook(pm, toy_module):
    class Plugin:
        @hookspecs.hookimpl
        def posttrain_register_methods(self, registry):
            registry.add("zz-hooked-toy", toy_module.Toy)

    pm.register(Plugin(), name="throwaway")
    method_class, entry = registry.resolve_method("zz-hooked-toy")
    assert method_class is toy_module.Toy and entry is None


def test_hook_method_conflicting_with_distribution(pm, toy_module, fake_site):
    fake_site.add("pt-clash", methods={"zz-clash": "pt_clash:M"}, module="pt_clash", code="class M:\n    pass\n")

    class Plugin:
        @hookspecs.hookimpl
        def posttrain_register_methods(self, registry):
            registry.add("zz-clash", toy_module.Toy)

    pm.register(Plugin(), name="clasher")
    with pytest.raises(PluginError, match="pt-clash and by a posttrain_register_methods hook"):
        registry.resolve_method("zz-clash")


def test_invalid_method_name_rejected():
    reg = registry.MethodRegistry()
    with pytest.raises(PluginError, match="must match"):
        reg.add("Bad Name", object)


def test_register_reward_through_hook_and_entry_point(pm, fake_site):
    fake_site.add(
        "pt-rewards-x",
        rewards={"zz-ep-reward": "pt_rewards_x:score"},
        module="pt_rewards_x",
        code="def score(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n",
    )

    class Plugin:
        @hookspecs.hookimpl
        def posttrain_register_rewards(self, registry):
            registry.add("zz-hook-reward", lambda prompts, completions, **kw: [0.5] * len(completions))

    pm.register(Plugin(), name="rewarder")
    rewards = registry.resolve_rewards(["zz-hook-reward", "zz-ep-reward"])
    assert rewards["zz-hook-reward"](["p"], ["c"]) == [0.5]
    assert rewards["zz-ep-reward"](["p"], ["c", "d"]) == [1.0, 1.0]
    with pytest.raises(PluginError, match="unknown reward 'zz-missing'"):
        registry.resolve_rewards(["zz-missing"])


def test_callbacks_receive_training_events(pm, runner, toy_rows):
    from posttrain.loop import train

    events = []

    class Recorder:
        def on_train_begin(self, ctx):
            events.append("begin")

        def on_log(self, ctx, metrics):
            events.append(("log", metrics["step"]))

        def on_save(self, ctx, path):
            events.append(("save", path.name))

        def on_train_end(self, ctx):
            events.append("end")

    class Plugin:
        @hookspecs.hookimpl
        def posttrain_add_callbacks(self, registry, config):  # implementations take any subset of arguments
            if "recorder" in config.report_to:
                registry.add(Recorder())

    pm.register(Plugin(), name="recorder")
    config = runner.config("cb", max_steps=2, save_steps=1, report_to=["recorder"])
    train(runner.module.Toy(), config, train_dataset=toy_rows, callbacks=registry.callbacks_for(config))
    assert events == ["begin", ("log", 1), ("save", "checkpoint-1"), ("log", 2), "end"]


def test_misspelled_hook_is_an_error():
    import pluggy

    pm = pluggy.PluginManager("posttrain")
    pm.add_hookspecs(hookspecs)

    class Typo:
        @hookspecs.hookimpl
        def posttrain_register_method(self, registry):  # missing "s"
            pass

    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError, match="posttrain_register_method"):
        pm.check_pending()


def test_broken_plugin_module_is_skipped_with_warning(fake_site):
    fake_site.add(
        "pt-badhooks",
        plugins={"zz-badhooks": "pt_badhooks"},
        module="pt_badhooks",
        code="raise ImportError('missing dependency foo')\n",
    )
    registry.reset_plugin_manager()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.plugin_manager()
    assert any("zz-badhooks" in str(w.message) and "missing dependency foo" in str(w.message) for w in record)


def test_strict_plugins_turns_failure_into_error(fake_site, monkeypatch):
    fake_site.add(
        "pt-badhooks2",
        plugins={"zz-badhooks2": "pt_badhooks2"},
        module="pt_badhooks2",
        code="raise ImportError('nope')\n",
    )
    monkeypatch.setenv("POSTTRAIN_STRICT_PLUGINS", "1")
    registry.reset_plugin_manager()
    with pytest.raises(PluginError, match="zz-badhooks2"):
        registry.plugin_manager()
