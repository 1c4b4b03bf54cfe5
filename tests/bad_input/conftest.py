"""Fixtures of the bad-input catalogue; the shared helpers live in ``_catalogue.py``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

# the test modules here import the helpers as `bad_input_catalogue` (pytest's importlib mode puts no test
# directory on sys.path)
_spec = importlib.util.spec_from_file_location("bad_input_catalogue", Path(__file__).with_name("_catalogue.py"))
catalogue = importlib.util.module_from_spec(_spec)
sys.modules["bad_input_catalogue"] = catalogue
_spec.loader.exec_module(catalogue)


@pytest.fixture(scope="session")
def odd_models(tmp_path_factory, tiny_model_dir):
    """Models that are wrong in one way each (built once)."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("odd-models")
    bert = root / "bert"  # a transformers model, but an encoder: no causal-LM class for it
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=120)).save_pretrained(
        bert
    )
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bert)
    nopad = root / "nopad"  # EOS but no pad token: handled, padding reuses EOS
    shutil.copytree(tiny_model_dir, nopad)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    noeos = root / "noeos"  # neither: explained
    shutil.copytree(nopad, noeos)
    tok.eos_token = None
    tok.save_pretrained(noeos)
    notemplate = root / "notemplate"  # conversational rows need a chat template
    shutil.copytree(tiny_model_dir, notemplate)
    (notemplate / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((notemplate / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(config))
    notok = root / "notokenizer"  # weights and config, no tokenizer files
    shutil.copytree(tiny_model_dir, notok)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (notok / name).unlink(missing_ok=True)
    unknown = root / "unknowntype"  # a model type this transformers does not know
    shutil.copytree(tiny_model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "zzzformer"
    (unknown / "config.json").write_text(json.dumps(config))
    return {
        "bert": bert,
        "nopad": nopad,
        "noeos": noeos,
        "notemplate": notemplate,
        "notokenizer": notok,
        "unknowntype": unknown,
    }


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir):
    """An SFT run of 3 steps with checkpoint-1 and checkpoint-2, for the resume and output_dir cases."""
    root = tmp_path_factory.mktemp("finished")
    (root / "lm.jsonl").write_text(catalogue.jsonl(catalogue.LM))
    args = [
        "train",
        "sft",
        *catalogue.base_args({"model": tiny_model_dir, "tmp": root}),
        "--dataset",
        root / "lm.jsonl",
    ]
    outcome = catalogue.cli(*args, "--max_steps", "3", "--save_steps", "1")
    assert outcome.code == 0, outcome.err
    return root / "out"


@pytest.fixture
def paths(tmp_path, tiny_model_dir, odd_models, finished_run):
    return {"tmp": tmp_path, "model": tiny_model_dir, "finished": finished_run, **odd_models}


@pytest.fixture
def watched(paths, tiny_model_dir, odd_models):
    """Everything a case must leave untouched."""
    return (paths["tmp"], tiny_model_dir, *odd_models.values())


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model or tokenizer is loaded: for problems that must be found before that."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the problem was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
