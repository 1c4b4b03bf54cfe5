"""Discovery from metadata: status, compatibility, broken plugins, conflicts, operator lists."""

from __future__ import annotations

from importlib import metadata

import pytest
from posttrain import _discovery as discovery
from posttrain._errors import PluginError

GOOD = "def Method():\n    pass\n"


def names(kind="method"):
    return {e.name: e for e in discovery.discover((kind,))}


def test_stable_and_experimental_status_from_classifier(fake_site):
    fake_site.add("pt-stable", methods={"zz-stable": "pt_stable:Method"}, module="pt_stable", code=GOOD)
    fake_site.add("pt-beta", status="4 - Beta", methods={"zz-beta": "pt_beta:Method"}, module="pt_beta", code=GOOD)
    fake_site.add("pt-none", status=None, methods={"zz-none": "pt_none:Method"}, module="pt_none", code=GOOD)
    fake_site.add(
        "pt-mature", status="6 - Mature", methods={"zz-mature": "pt_mature:Method"}, module="pt_mature", code=GOOD
    )
    found = names()
    assert found["zz-stable"].status == "stable"
    assert found["zz-mature"].status == "stable"
    assert found["zz-beta"].status == "experimental"
    assert found["zz-none"].status == "experimental"
    assert found["zz-stable"].version == "1.0.0" and found["zz-stable"].summary == "pt-stable test plugin"


def test_status_function_takes_lowest_classifier():
    class Dist:
        metadata = {"Classifier": None}

    class Meta(dict):
        def get_all(self, key):
            return ["Development Status :: 5 - Production/Stable", "Development Status :: 3 - Alpha"]

    dist = Dist()
    dist.metadata = Meta()
    assert discovery.status(dist) == "experimental"


def test_inactive_status(fake_site):
    fake_site.add("pt-old", status="7 - Inactive", methods={"zz-old": "pt_old:Method"}, module="pt_old", code=GOOD)
    entry = names()["zz-old"]
    assert entry.status == "inactive"
    with pytest.raises(PluginError, match="inactive"):
        discovery.find("method", "zz-old")
    assert discovery.find("method", "zz-old", allow_inactive=True).package == "pt-old"


def test_broken_module_missing(fake_site):
    fake_site.add("pt-broken", methods={"zz-broken": "pt_not_there:Method"})
    entry = names()["zz-broken"]
    assert entry.status == "broken"
    assert "pt_not_there" in entry.reason
    with pytest.raises(PluginError, match="broken"):
        discovery.find("method", "zz-broken")


def test_broken_invalid_name_and_value(fake_site):
    fake_site.add(
        "pt-badname",
        methods={"Bad_Name": "pt_badname:Method", "zz-novalue": "pt_badname"},
        module="pt_badname",
        code=GOOD,
    )
    found = names()
    assert found["Bad_Name"].status == "broken" and "invalid name" in found["Bad_Name"].reason
    assert found["zz-novalue"].status == "broken" and "module:attribute" in found["zz-novalue"].reason


def test_incompatible_core_range(fake_site):
    fake_site.add(
        "pt-future",
        requires="posttrain>=9.0,<10",
        methods={"zz-future": "pt_future:Method"},
        module="pt_future",
        code=GOOD,
    )
    entry = names()["zz-future"]
    assert entry.status == "incompatible"
    assert ">=9.0,<10" in entry.reason and discovery.core_version() in entry.reason
    with pytest.raises(PluginError, match="incompatible.*pip install -U pt-future"):
        discovery.find("method", "zz-future")


def test_malformed_core_requirement_is_broken(fake_site):
    fake_site.add(
        "pt-garbled",
        requires="posttrain (>=banana)",
        methods={"zz-garbled": "pt_garbled:Method"},
        module="pt_garbled",
        code=GOOD,
    )
    entry = names()["zz-garbled"]
    assert entry.status == "broken" and "malformed" in entry.reason


def test_conflict_names_both_distributions(fake_site):
    fake_site.add("pt-one", methods={"zz-dup": "pt_one:Method"}, module="pt_one", code=GOOD)
    fake_site.add("pt-two", methods={"zz-dup": "pt_two:Method"}, module="pt_two", code=GOOD)
    dups = [e for e in discovery.discover(("method",)) if e.name == "zz-dup"]
    assert {e.status for e in dups} == {"conflict"}
    assert all("pt-one and pt-two" in e.reason for e in dups)
    with pytest.raises(PluginError, match="pt-one and pt-two.*'pt-one:zz-dup' or 'pt-two:zz-dup'"):
        discovery.find("method", "zz-dup")
    # naming the provider resolves it
    assert discovery.find("method", "pt-two:zz-dup").package == "pt-two"


def test_broken_plugin_does_not_break_others(fake_site):
    fake_site.add("pt-broken2", methods={"zz-b2": "pt_nowhere:Method"})
    fake_site.add("pt-fine", methods={"zz-fine": "pt_fine:Method"}, module="pt_fine", code=GOOD)
    found = names()
    assert found["zz-b2"].status == "broken"
    assert found["zz-fine"].status == "stable"


def test_unknown_method_suggests_installed_names(fake_site):
    fake_site.add("pt-speller", methods={"zz-speller": "pt_speller:Method"}, module="pt_speller", code=GOOD)
    with pytest.raises(PluginError, match="Did you mean 'zz-speller'"):
        discovery.find("method", "zz-spellr")


def test_rewards_and_plugins_groups(fake_site):
    fake_site.add(
        "pt-rw",
        rewards={"zz-acc": "pt_rw:acc"},
        plugins={"zz-logger": "pt_rw"},
        module="pt_rw",
        code="def acc(prompts, completions, **kw):\n    return [1.0] * len(completions)\n",
    )
    assert names("reward")["zz-acc"].status == "stable"
    assert names("plugin")["zz-logger"].status == "stable"


def test_operator_allow_and_block_lists(fake_site, monkeypatch):
    fake_site.add("pt-a", methods={"zz-a": "pt_a:Method"}, module="pt_a", code=GOOD)
    fake_site.add("pt-b", methods={"zz-b": "pt_b:Method"}, module="pt_b", code=GOOD)
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "pt-a")
    assert "zz-a" not in names() and "zz-b" in names()
    monkeypatch.delenv("POSTTRAIN_DISABLE_PLUGINS")
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "zz-b")
    assert set(names()) == {"zz-b"}


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ("0.1.0", ">=0.1,<1", True),
        ("1.0.0", ">=0.1,<1", False),
        ("0.1.5", "~=0.1.0", True),
        ("0.2.0", "~=0.1.0", False),
        ("0.1.0", "==0.1.*", True),
        ("0.2", "==0.1.*", False),
        ("0.1.0", "!=0.1.0", False),
        ("2.0", ">1.9", True),
        ("0.1.0.dev1", ">=0.1", True),
        ("1.0", "", True),
    ],
)
def test_version_satisfies(version, spec, expected):
    assert discovery.version_satisfies(version, spec) is expected


def test_version_satisfies_rejects_garbage():
    with pytest.raises(ValueError):
        discovery.version_satisfies("1.0", ">=apple")


def test_core_requirement_reads_requires_dist():
    class Dist:
        requires = ["torch>=2", "posttrain>=0.1,<1; python_version >= '3.10'"]

    assert discovery.core_requirement(Dist()) == ">=0.1,<1"


def test_duplicate_distribution_on_path_counts_once(fake_site, tmp_path, monkeypatch):
    import shutil

    dist = fake_site.add("pt-twice", methods={"zz-twice": "pt_twice:Method"}, module="pt_twice", code=GOOD)
    second = tmp_path / "second-site"
    second.mkdir()
    shutil.copytree(dist, second / dist.name)
    monkeypatch.syspath_prepend(str(second))
    assert [e.name for e in discovery.discover(("method",))].count("zz-twice") == 1
    assert metadata.version("pt-twice") == "1.0.0"


def test_a_distribution_without_summary_under_the_importlib_metadata_backport(fake_site):
    """mlflow and OpenTelemetry import the importlib_metadata backport, which replaces importlib.metadata's
    finders and raises KeyError for a missing METADATA field where the standard library returns None."""
    pytest.importorskip("importlib_metadata", reason="the importlib_metadata backport is not installed")
    dist = fake_site.add(
        "pt-nosummary", methods={"zz-nosummary": "pt_nosummary:M"}, module="pt_nosummary", code="M = 1"
    )
    metadata_file = dist / "METADATA"
    metadata_file.write_text(
        "".join(line + "\n" for line in metadata_file.read_text().splitlines() if "Summary" not in line)
    )
    (entry,) = [e for e in discovery.discover(("method",)) if e.name == "zz-nosummary"]
    assert entry.summary == "" and entry.package == "pt-nosummary"
