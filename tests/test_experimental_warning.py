"""ExperimentalWarning: once per method per process, silenced by POSTTRAIN_EXPERIMENTAL_SILENCE."""

from __future__ import annotations

import warnings

import posttrain
import pytest
from posttrain import _discovery as discovery
from posttrain import _registry as registry

CODE = """
class Method:
    name = "x"
    config_class = object
    dataset_formats = ("language_modeling",)

    def prepare(self, dataset, ctx): ...

    def collate(self, rows, ctx): ...

    def loss(self, model, batch, ctx): ...
"""


@pytest.fixture
def two_experimental(fake_site):
    fake_site.add("pt-exp-a", status="3 - Alpha", methods={"zz-expa": "pt_exp_a:Method"}, module="pt_exp_a", code=CODE)
    fake_site.add("pt-exp-b", status="4 - Beta", methods={"zz-expb": "pt_exp_b:Method"}, module="pt_exp_b", code=CODE)
    fake_site.add("pt-st", methods={"zz-st": "pt_st:Method"}, module="pt_st", code=CODE)


def caught(*names):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for name in names:
            registry.resolve_method(name)
    return [w for w in record if issubclass(w.category, posttrain.ExperimentalWarning)]


def test_warns_once_per_method_and_names_package(two_experimental):
    found = caught("zz-expa", "zz-expa", "zz-expb")
    assert len(found) == 2
    text = str(found[0].message)
    assert "zz-expa" in text and "pt-exp-a 1.0.0" in text and "POSTTRAIN_EXPERIMENTAL_SILENCE" in text
    assert issubclass(posttrain.ExperimentalWarning, FutureWarning)
    assert posttrain.ExperimentalWarning.__module__ == "posttrain"


def test_stable_never_warns(two_experimental):
    assert caught("zz-st") == []


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_silence_all(two_experimental, monkeypatch, value):
    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", value)
    assert caught("zz-expa", "zz-expb") == []


def test_silence_some(two_experimental, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", "zz-expa")
    found = caught("zz-expa", "zz-expb")
    assert len(found) == 1 and "zz-expb" in str(found[0].message)


def test_zero_does_not_silence(two_experimental, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", "0")
    assert len(caught("zz-expa")) == 1


def test_unparseable_value_warns_and_does_not_silence(two_experimental, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", "Yes Please!")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.resolve_method("zz-expa")
    messages = [str(w.message) for w in record]
    assert any("not understood" in m for m in messages)
    assert any(issubclass(w.category, posttrain.ExperimentalWarning) for w in record)


def test_warning_state_is_per_process(two_experimental):
    assert len(caught("zz-expa")) == 1
    discovery._warned.clear()  # a new process starts with an empty set
    assert len(caught("zz-expa")) == 1
