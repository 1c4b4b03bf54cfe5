"""Bad input, class "plugins": unknown names, broken, failing, non-conforming and conflicting plugins, and the
operator lists that hide them.

Every command that loads a plugin (``train``, ``info``, ``check-data``, ``doctor``) turns *any* failure of its
code at import (an exception, a ``BaseException``, ``sys.exit``) into one line naming the package; an entry
point that is not a method class is a contract error naming the package. Allow/block lists match names as pip
does (PEP 503), so a block cannot be dodged by spelling.
"""

from __future__ import annotations

import sys
import warnings

import pytest
from bad_input_catalogue import LM, PAIRS, PROMPTS, Case, cli, jsonl, run_case, train

LM_FILE = {"lm.jsonl": LM}
D = ["--dataset", "{tmp}/lm.jsonl"]
TOY = "TOY"  # replaced by the toy method's source


def dist(package: str, code: str = TOY, kind: str = "methods", name: str | None = None, attr: str = "Toy", **kw):
    module = package.replace("-", "_")
    value = f"{module}:{attr}" if attr else module
    return {"name": package, kind: {name or package.split("-")[-1]: value}, "module": module, "code": code, **kw}


EXIT_AT_IMPORT = "import sys\nsys.exit(3)\n"
BASE_EXCEPTION = "class Boom(BaseException):\n    pass\n\n\nraise Boom('kaboom')\n"
NOT_A_CLASS = "def Toy():\n    return None\n"
NO_LOSS = TOY + "\ndel Toy.loss\n"
INIT_RAISES = TOY + "\n\ndef _init(self):\n    raise RuntimeError('needs a GPU')\n\n\nToy.__init__ = _init\n"
HOOK_RAISES = (
    "from posttrain import hookimpl\n\n\n@hookimpl\ndef posttrain_add_callbacks(registry, config):\n"
    "    raise RuntimeError('tracker server unreachable')\n"
)
HOOK_MISSPELT = (
    "from posttrain import hookimpl\n\n\n@hookimpl\ndef posttrain_add_callback(registry, config):\n    pass\n"
)

CASES = [
    # -- names
    Case("unknown-method-close", train("dpp", "--dataset", "{tmp}/pairs.jsonl"), 2,
         ["unknown method 'dpp'"], ["Did you mean 'dpo'?"]),
    Case("unknown-method-far", train("zzz-method"), 2,
         ["unknown method 'zzz-method'"], ["`posttrain install zzz-method`", "`posttrain list`"]),
    Case("unknown-reward", train("grpo", "--dataset", "{tmp}/prompts.jsonl", "--reward_funcs", "acuracy",
         "--num_generations", "2"), 2,
         ["unknown reward 'acuracy'"], ["Did you mean 'accuracy'?"], {"prompts.jsonl": PROMPTS}),
    Case("online-method-without-reward", train("grpo", "--dataset", "{tmp}/prompts.jsonl", "--num_generations", "2"), 2,
         ["needs at least one reward function"], ["--reward_funcs accuracy"], {"prompts.jsonl": PROMPTS}),
    Case("method-from-incompatible-plugin", train("future", *D), 2,
         ["method 'future' from posttrain-future 1.0.0 is incompatible", "needs posttrain>=9,<10"],
         ["pip install -U posttrain-future"], LM_FILE, site=[dist("posttrain-future", requires="posttrain>=9,<10")]),
    Case("method-provided-twice", train("twin", *D), 2,
         ["method 'twin' is provided by pt-twin-a and pt-twin-b"], ["'pt-twin-a:twin' or 'pt-twin-b:twin'"], LM_FILE,
         site=[dist("pt-twin-a", name="twin"), dist("pt-twin-b", name="twin")]),
    Case("method-module-not-installed", train("hollow", *D), 2,
         ["method 'hollow' from pt-hollow 1.0.0 is broken", "'pt_hollow_missing' is not importable"],
         ["pip install --force-reinstall pt-hollow"], LM_FILE,
         site=[{"name": "pt-hollow", "methods": {"hollow": "pt_hollow_missing:Toy"}}]),
    # -- a plugin's code fails while it is imported or created
    Case("method-fails-to-import", train("crash", *D), 2,
         ["method 'crash' from pt-crash 1.0.0 failed to import",
          "it raised ModuleNotFoundError: No module named 'flux_capacitor'",
          "(entry point crash = pt_crash:Toy in posttrain.methods)", "This is a problem in pt-crash"],
         ["`posttrain install --force-reinstall pt-crash`", "`posttrain uninstall pt-crash`",
          "POSTTRAIN_DISABLE_PLUGINS=pt-crash", "`posttrain doctor` shows the traceback"], LM_FILE,
         site=[dist("pt-crash", "import flux_capacitor\n")]),
    Case("method-calls-sys-exit-at-import-train", train("quitter", *D), 2,
         ["method 'quitter' from pt-quitter 1.0.0 failed to import", "it called sys.exit(3)"],
         ["POSTTRAIN_DISABLE_PLUGINS=pt-quitter"], LM_FILE, site=[dist("pt-quitter", EXIT_AT_IMPORT)]),
    Case("method-calls-sys-exit-at-import-info", ["info", "quitter"], 2,
         ["method 'quitter' from pt-quitter 1.0.0 failed to import", "sys.exit(3)"],
         ["POSTTRAIN_DISABLE_PLUGINS=pt-quitter"], site=[dist("pt-quitter", EXIT_AT_IMPORT)]),
    Case("method-calls-sys-exit-at-import-check-data", ["check-data", "quitter", "{tmp}/lm.jsonl"], 2,
         ["method 'quitter' from pt-quitter 1.0.0 failed to import", "sys.exit(3)"],
         ["POSTTRAIN_DISABLE_PLUGINS=pt-quitter"], LM_FILE, site=[dist("pt-quitter", EXIT_AT_IMPORT)]),
    Case("method-raises-a-base-exception-at-import", train("boom", *D), 2,
         ["method 'boom' from pt-boom 1.0.0 failed to import", "it raised Boom: kaboom"],
         ["`posttrain uninstall pt-boom`", "POSTTRAIN_DISABLE_PLUGINS=pt-boom"],
         LM_FILE, site=[dist("pt-boom", BASE_EXCEPTION)]),
    Case("entry-point-is-not-a-class", train("func", *D), 2,
         ["method 'func' from pt-func 1.0.0 breaks the plugin contract", "pt_func:Toy is a function, not a class"],
         ["This is a problem in pt-func", "POSTTRAIN_DISABLE_PLUGINS=pt-func"], LM_FILE,
         site=[dist("pt-func", NOT_A_CLASS)]),
    Case("entry-point-is-not-a-class-info", ["info", "func"], 2,
         ["method 'func' from pt-func 1.0.0 breaks the plugin contract"], ["This is a problem in pt-func"],
         site=[dist("pt-func", NOT_A_CLASS)]),
    Case("method-class-lacks-loss", train("noloss", *D), 2,
         ["method 'noloss' from pt-noloss 1.0.0 breaks the plugin contract", "lacks loss(model, batch, ctx)"],
         ["This is a problem in pt-noloss"], LM_FILE, site=[dist("pt-noloss", NO_LOSS)]),
    Case("method-constructor-raises", train("fussy", *D), 2,
         ["method 'fussy'", "failed when created with no arguments: RuntimeError: needs a GPU"],
         ["this is a problem in the plugin"], LM_FILE, site=[dist("pt-fussy", INIT_RAISES)]),
    Case("method-constructor-raises-check-data", ["check-data", "fussy", "{tmp}/lm.jsonl"], 2,
         ["method 'fussy'", "failed when created with no arguments"], ["this is a problem in the plugin"], LM_FILE,
         site=[dist("pt-fussy", INIT_RAISES)]),
    # -- hook plugins (posttrain.plugins)
    Case("hook-plugin-raises-in-a-hook", train("sft", *D), 2,
         ["plugin 'hooky' from pt-hooky 1.0.0 failed in posttrain_add_callbacks: it raised RuntimeError: tracker "
          "server unreachable", "(entry point hooky = pt_hooky in posttrain.plugins)"],
         ["`posttrain uninstall pt-hooky`", "POSTTRAIN_DISABLE_PLUGINS=pt-hooky"], LM_FILE,
         site=[dist("pt-hooky", HOOK_RAISES, kind="plugins", name="hooky", attr="")]),
    Case("hook-plugin-fails-to-import-is-skipped", train("sft", *D), 0,
         ["plugin 'hooky' from pt-hooky 1.0.0 failed to import: it called sys.exit(3)",
          "Skipped: this run goes on without it"], ["POSTTRAIN_DISABLE_PLUGINS=pt-hooky", "POSTTRAIN_STRICT_PLUGINS=1"],
         LM_FILE, site=[dist("pt-hooky", EXIT_AT_IMPORT, kind="plugins", name="hooky", attr="")]),
    Case("hook-plugin-fails-to-import-strict", train("sft", *D), 2,
         ["plugin 'hooky' from pt-hooky 1.0.0 failed to import: it called sys.exit(3)"],
         ["POSTTRAIN_DISABLE_PLUGINS=pt-hooky"], LM_FILE, {"POSTTRAIN_STRICT_PLUGINS": "1"},
         site=[dist("pt-hooky", EXIT_AT_IMPORT, kind="plugins", name="hooky", attr="")]),
    Case("hook-plugin-with-misspelt-hook-is-skipped", train("sft", *D), 0,
         ["plugin 'hooky' from pt-hooky 1.0.0 failed to register its hooks",
          "unknown hook 'posttrain_add_callback'", "Skipped"], ["POSTTRAIN_DISABLE_PLUGINS=pt-hooky"],
         LM_FILE, site=[dist("pt-hooky", HOOK_MISSPELT, kind="plugins", name="hooky", attr="")]),
    # -- listing and diagnosing
    Case("list-check-fails-on-a-broken-plugin", ["list", "--check"], 1,
         ["hollow (pt-hollow)", "'pt_hollow_missing' is not importable"], [],
         site=[{"name": "pt-hollow", "methods": {"hollow": "pt_hollow_missing:Toy"}}]),
    Case("list-check-ignores-display-filters", ["list", "--check", "--status", "stable"], 1,
         ["hollow (pt-hollow)"], [], site=[{"name": "pt-hollow", "methods": {"hollow": "pt_hollow_missing:Toy"}}]),
    # -- operator lists, spelt any way pip accepts
    Case("block-list-case-and-underscores", train("sft", *D), 2,
         ["unknown method 'sft'", "POSTTRAIN_DISABLE_PLUGINS='Posttrain_SFT'"], ["change or unset it"], LM_FILE,
         {"POSTTRAIN_DISABLE_PLUGINS": "Posttrain_SFT"}),
    Case("block-list-dots", train("sft", *D), 2,
         ["unknown method 'sft'", "POSTTRAIN_DISABLE_PLUGINS='posttrain.sft'"], ["change or unset it"], LM_FILE,
         {"POSTTRAIN_DISABLE_PLUGINS": "posttrain.sft"}),
    Case("block-list-runs-of-separators", train("sft", *D), 2,
         ["unknown method 'sft'"], ["change or unset it"], LM_FILE, {"POSTTRAIN_DISABLE_PLUGINS": " POSTTRAIN-_-sft "}),
    Case("block-list-method-name-in-capitals", ["check-data", "dpo", "{tmp}/pairs.jsonl"], 2,
         ["unknown method 'dpo'", "POSTTRAIN_DISABLE_PLUGINS='DPO'"], ["change or unset it"],
         {"pairs.jsonl": PAIRS}, {"POSTTRAIN_DISABLE_PLUGINS": "DPO"}),
    Case("allow-list-spelt-differently-allows", ["check-data", "dpo", "{tmp}/pairs.jsonl"], 0, ["ok: 8 rows"], [],
         {"pairs.jsonl": PAIRS}, {"POSTTRAIN_PLUGINS": "Posttrain_DPO"}, stream="out"),
]  # fmt: skip


@pytest.fixture
def site(fake_site, toy_method_source):
    class Site:
        def add(self, code=None, **kw):
            if code is not None:
                kw["code"] = code.replace(TOY, toy_method_source)
            return fake_site.add(**kw)

    return Site()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plugin_case(case, paths, watched, monkeypatch, site):
    run_case(case, paths, monkeypatch, watched, site)


def test_reward_function_that_raises_names_reward_and_prompt(fake_site, paths, watched, monkeypatch):
    """A reward function that raises stops the run with one message naming the reward, the completion, the
    dataset row, the step, the exception and where in the function it was raised (file:line)."""
    fake_site.add(
        "pt-fragile-rewards",
        rewards={"fragile": "pt_fragile:fragile"},
        module="pt_fragile",
        code="def fragile(prompts, completions, **kw):\n"
        "    if any(p.startswith('5+') for p in prompts):\n"
        "        raise ValueError('cannot parse the answer')\n"
        "    return [0.0] * len(completions)\n",
    )
    flags = ["--reward_funcs", "fragile", "--num_generations", "2", "--max_completion_length", "2"]
    flags += ["--per_device_train_batch_size", "16", "--save_steps", "1"]  # all 8 prompts x 2 in step 1
    case = Case("reward-function-raises", train("grpo", "--dataset", "{tmp}/prompts.jsonl", *flags), 2,
                ["reward function 'fragile' raised on completion 0 of dataset row 5 at step 1", "cannot parse the answer"],
                ["pt_fragile.py:3 in fragile"], {"prompts.jsonl": PROMPTS}, modifies="out")  # fmt: skip
    run_case(case, paths, monkeypatch, watched)
    assert not list((paths["tmp"] / "out").glob("*checkpoint*"))
    assert not (paths["tmp"] / "out" / ".posttrain.lock").exists(), "the lock outlived a failed run"


RAISES_ON_IMPORT = "raise RuntimeError('a hook plugin was imported')\n"


@pytest.mark.parametrize(
    "argv",
    [["check-data", "dpo", "{tmp}/pairs.jsonl"], ["train", "dpo", "--help"], ["info", "dpo"]],
    ids=["check-data", "train-help", "info"],
)
def test_commands_that_need_no_hook_plugins_do_not_import_them(argv, paths, fake_site):
    fake_site.add("pt-loud", plugins={"loud": "pt_loud"}, module="pt_loud", code=RAISES_ON_IMPORT)
    (paths["tmp"] / "pairs.jsonl").write_text(jsonl(PAIRS))
    outcome = cli(*[a.format(**paths) for a in argv])
    assert outcome.code == 0, outcome.err
    assert "pt_loud" not in sys.modules and "loud" not in outcome.err and "Traceback" not in outcome.err


def test_silence_list_matches_names_as_pip_does(monkeypatch):
    from posttrain import ExperimentalWarning
    from posttrain import _registry as registry

    monkeypatch.setenv("POSTTRAIN_EXPERIMENTAL_SILENCE", "ORPO, Tpo")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.resolve_method("orpo", hooks=False)
        registry.resolve_method("tpo", hooks=False)
    assert not [w for w in record if issubclass(w.category, ExperimentalWarning)]


def test_allow_and_block_lists_normalise_like_pip(monkeypatch):
    from posttrain import _discovery as discovery

    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "Posttrain__DPO,posttrain.kto")
    names = {e.name for e in discovery.discover(("method",))}
    assert "dpo" not in names and "kto" not in names and "sft" in names
    monkeypatch.delenv("POSTTRAIN_DISABLE_PLUGINS")
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "POSTTRAIN-SFT")
    assert {e.name for e in discovery.discover(("method",))} == {"sft"}


def test_doctor_names_a_plugin_that_exits_at_import(site, monkeypatch):
    """doctor imports each plugin in a subprocess: sys.exit there is reported with its package and traceback."""
    site.add(**dist("pt-quitter", EXIT_AT_IMPORT))
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "pt-quitter")
    outcome = cli("doctor")
    assert outcome.code == 1
    assert "FAIL method quitter" in outcome.out and "pt-quitter 1.0.0" in outcome.out
    assert "SystemExit: 3" in outcome.out and "1 with problems" in outcome.out
