"""The shipped rewards resolve by name, and third-party reward packages plug in the same two ways."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import posttrain_rewards
import pytest
import tomllib
from posttrain import PluginError, hookimpl
from posttrain import _registry as registry


def test_shipped_rewards_resolve_by_entry_point_name():
    found = registry.resolve_rewards(["accuracy", "format", "length_penalty", "reward_model"])
    assert found == {
        "accuracy": posttrain_rewards.accuracy,
        "format": posttrain_rewards.format_reward,
        "length_penalty": posttrain_rewards.length_penalty,
        "reward_model": posttrain_rewards.reward_model,
    }


def test_listing_reads_metadata_without_importing(monkeypatch):
    from posttrain import _discovery as discovery

    entries = {e.name: e for e in discovery.discover(("reward",)) if e.package == "posttrain-rewards"}
    assert set(entries) == {"accuracy", "format", "length_penalty", "reward_model"}
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert {e.status for e in entries.values()} == {"stable"} and entries["accuracy"].version == declared


def test_a_third_party_distribution_with_an_entry_point(rewards_fake_site):
    """A fake installed package: a .dist-info with a posttrain.rewards entry point, and its module."""
    dist = rewards_fake_site / "acme_rewards-0.3.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-rewards\nVersion: 0.3.0\nSummary: Acme rewards\n"
        "Classifier: Development Status :: 4 - Beta\nRequires-Dist: posttrain>=1.0,<2\n"
    )
    (dist / "entry_points.txt").write_text("[posttrain.rewards]\nshouting = acme_rewards:shouting\n")
    (rewards_fake_site / "acme_rewards.py").write_text(
        textwrap.dedent("""
        def shouting(prompts, completions, **columns):
            return [float(c.isupper()) for c in completions]
    """)
    )
    importlib.invalidate_caches()
    with pytest.warns(FutureWarning, match="experimental"):  # 4 - Beta: an experimental reward warns once
        found = registry.resolve_rewards(["shouting", "accuracy"])
    assert found["shouting"](["q", "q"], ["HEY", "hey"]) == [1.0, 0.0]
    assert found["accuracy"] is posttrain_rewards.accuracy


def test_a_reward_registered_through_the_hook_on_a_fresh_manager():
    class Plugin:
        @hookimpl
        def posttrain_register_rewards(self, registry):
            registry.add("exact_42", lambda prompts, completions, **columns: [float(c == "42") for c in completions])

    registry.reset_plugin_manager()
    registry.plugin_manager().register(Plugin(), name="exact-42")
    found = registry.resolve_rewards(["exact_42"])
    assert found["exact_42"](["q", "q"], ["42", "41"]) == [1.0, 0.0]
    with pytest.raises(PluginError, match="unknown reward 'exact_43'"):
        registry.resolve_rewards(["exact_43"])
