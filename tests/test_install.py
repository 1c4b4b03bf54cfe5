"""``posttrain install`` / ``uninstall`` and the "not installed" errors that point to them.

Most tests replace pip with a recording fake; one installs a throwaway wheel built in tmp_path for
real and uninstalls it again, leaving the environment as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from posttrain import _discovery as discovery
from posttrain._errors import PluginError, PosttrainError
from posttrain.cli import install, main, plugin_index, uninstall

ROOT = Path(__file__).resolve().parents[1]
CORE = discovery.core_version()


def build_wheel(
    where: Path, name: str, version: str = "0.0.1", requires: str = "posttrain>=1.0,<2", method: str = "zz-tw"
) -> Path:
    """A minimal pure-Python wheel providing one method: no build backend, no network."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "class Method:\n    pass\n",
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: throwaway test plugin\n"
            f"Classifier: Development Status :: 3 - Alpha\nRequires-Dist: {requires}\n"
        ),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: posttrain-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[posttrain.methods]\n{method} = {module}:Method\n",
    }

    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},sha256={digest(text)},{len(text.encode())}\n" for path, text in files.items())
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    wheel = where / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture
def fake_pip(monkeypatch):
    """Record pip calls instead of running them; ``fake_pip.reply = (code, output)`` sets the answer."""

    class FakePip:
        calls: list[list[str]] = []
        constraints: list[str] = []
        reply = (0, "")

        def __call__(self, args, quiet, capture=True):
            self.calls.append(list(args))
            if "-c" in args:
                self.constraints.append(Path(args[args.index("-c") + 1]).read_text())
            return self.reply

    pip = FakePip()
    pip.calls, pip.constraints = [], []
    monkeypatch.setattr(install, "run_pip", pip)
    monkeypatch.setattr(install, "_snapshot", lambda: {})
    return pip


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake source checkout with plugins/posttrain-zzdemo, named by POSTTRAIN_CHECKOUT."""
    root = tmp_path / "checkout"
    (root / "core").mkdir(parents=True)
    (root / "core" / "pyproject.toml").write_text('[project]\nname = "posttrain"\nversion = "1.0.0"\n')
    plugin = root / "plugins" / "posttrain-zzdemo"
    plugin.mkdir(parents=True)
    (plugin / "pyproject.toml").write_text(
        '[project]\nname = "posttrain-zzdemo"\nversion = "1.0.0"\ndependencies = ["posttrain>=1.0,<2"]\n'
    )
    monkeypatch.setenv("POSTTRAIN_CHECKOUT", str(root))
    return root


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A plugin index of our own: zzdemo (official, unpublished) and a third-party package."""
    data = {
        "version": 1,
        "packages": [
            {"package": "posttrain-zzdemo", "origin": "official", "methods": ["zz-demo"], "published": False},
            {"package": "acme-zz-simpo", "origin": "third-party", "methods": ["zz-simpo"], "published": True},
        ],
    }
    path = tmp_path / "index.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("POSTTRAIN_PLUGIN_INDEX", str(path))
    return path


# -- names -> what pip is given ------------------------------------------------------------------------------


def test_the_builtin_index_maps_short_names_and_provided_names():
    assert plugin_index.lookup("dpo")["package"] == "posttrain-dpo"
    assert plugin_index.lookup("posttrain-dpo")["package"] == "posttrain-dpo"
    assert plugin_index.lookup("reward")["package"] == "posttrain-reward"  # the package's short form wins
    assert plugin_index.lookup("rewards")["package"] == "posttrain-rewards"
    assert plugin_index.lookup("accuracy")["package"] == "posttrain-rewards"  # a reward it provides
    assert plugin_index.lookup("no-such-thing") is None


def test_names_resolve_to_the_checkout_or_the_index(checkout, index):
    t = install.resolve("zz-demo", checkout, editable=False, use_index=False, exact=False)
    assert (t.source, t.package, t.pip_args) == (
        "checkout",
        "posttrain-zzdemo",
        [str(checkout / "plugins/posttrain-zzdemo")],
    )
    t = install.resolve("zzdemo", checkout, editable=True, use_index=False, exact=False)
    assert t.pip_args == ["-e", str(checkout / "plugins/posttrain-zzdemo")]
    # a version specifier, or --index, goes to the package index
    t = install.resolve("zzdemo>=2", checkout, editable=False, use_index=False, exact=False)
    assert (t.source, t.pip_args) == ("index", ["posttrain-zzdemo>=2"])
    assert install.resolve("zzdemo", None, editable=False, use_index=True, exact=False).pip_args == ["posttrain-zzdemo"]
    # third-party names from the index, unknown names get the prefix, --exact keeps them
    assert install.resolve("zz-simpo", checkout, False, False, False).pip_args == ["acme-zz-simpo"]
    assert install.resolve("nothing", checkout, False, False, False).pip_args == ["posttrain-nothing"]
    assert install.resolve("nothing", checkout, False, False, exact=True).pip_args == ["nothing"]
    assert install.resolve("zzdemo[extra]", None, False, True, False).pip_args == ["posttrain-zzdemo[extra]"]
    local = checkout / "plugins" / "posttrain-zzdemo"
    assert install.resolve(str(local), None, True, False, False).pip_args == [str(local)]  # a path: as given
    assert install.resolve(str(local), None, False, False, False, editable_paths=True).pip_args == ["-e", str(local)]
    url = "git+https://example.org/acme/simpo.git"
    assert install.resolve(url, checkout, False, False, False).pip_args == [url]


def test_the_checkout_is_found_from_the_core_install():
    """This suite runs from a checkout whose core is installed (editable) from core/."""
    assert install.source_checkout() == ROOT


def test_a_wrong_checkout_override_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CHECKOUT", str(tmp_path))
    with pytest.raises(PosttrainError, match="is not a posttrain checkout"):
        install.source_checkout()


def test_the_core_is_refused_by_name_and_by_path(fake_pip, capsys):
    for name in ("posttrain", "posttrain[peft]", "posttrain>=0.2", str(ROOT / "core")):
        assert main(["install", name]) == 2
        err = capsys.readouterr().err
        assert "is the posttrain core itself" in err and "never changes the core" in err, name
    assert fake_pip.calls == []


def test_a_local_package_needing_another_core_is_refused_before_pip(tmp_path, fake_pip, capsys):
    project = tmp_path / "posttrain-future"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "posttrain-future"\nversion = "3.0"\ndependencies = ["posttrain>=5,<6"]\n'
    )
    wheel = build_wheel(tmp_path, "posttrain-future-wheel", requires="posttrain>=5")
    for target in (str(project), str(wheel)):
        assert main(["install", target]) == 2
        err = capsys.readouterr().err
        assert "needs posttrain>=5" in err and f"installed core is posttrain {CORE}" in err, target
        assert "never changes the core" in err
    assert fake_pip.calls == []


def test_a_missing_path_is_a_clear_error(fake_pip, capsys):
    assert main(["install", "./no/such/dir"]) == 2
    assert "looks like a path, but it does not exist" in capsys.readouterr().err


# -- running pip ---------------------------------------------------------------------------------------------


def test_pip_runs_with_a_constraint_that_keeps_the_core(checkout, index, fake_pip, capsys):
    assert main(["install", "zz-demo", "zz-simpo", "--upgrade"]) == 0
    (args,) = fake_pip.calls
    assert args[0] == "install" and "--upgrade" in args
    assert str(checkout / "plugins/posttrain-zzdemo") in args and "acme-zz-simpo" in args
    assert fake_pip.constraints == [f"posttrain=={CORE}\n"]


def test_dry_run_prints_the_command_and_runs_nothing(checkout, index, fake_pip, capsys):
    assert main(["install", "zz-demo", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert f"-m pip install -c <posttrain=={CORE}>" in out.out and "posttrain-zzdemo" in out.out
    assert "zz-demo -> posttrain-zzdemo from the source checkout" in out.err
    assert fake_pip.calls == []


def test_not_on_the_index_and_no_checkout_says_so_plainly(index, fake_pip, monkeypatch, capsys):
    monkeypatch.setattr(install, "source_checkout", lambda: None)
    fake_pip.reply = (1, "ERROR: No matching distribution found for posttrain-zzdemo\n")
    assert main(["install", "zz-demo"]) == 2
    err = capsys.readouterr().err
    assert "could not install posttrain-zzdemo: posttrain-zzdemo is not published on PyPI yet" in err
    assert "no posttrain source checkout was found" in err
    assert "posttrain install /path/to/posttrain/plugins/posttrain-zzdemo" in err
    fake_pip.reply = (1, "ERROR: No matching distribution found for posttrain-nothing\n")
    assert main(["install", "nothing"]) == 2
    assert "the package index pip uses has no posttrain-nothing (check the spelling" in capsys.readouterr().err


def test_a_package_needing_another_core_is_refused_with_pips_reason(fake_pip, monkeypatch, capsys):
    monkeypatch.setattr(install, "source_checkout", lambda: None)
    fake_pip.reply = (
        1,
        "ERROR: Cannot install posttrain-zzdemo==2.0 because these package versions have conflicting dependencies.\n"
        "The conflict is caused by:\n"
        f"    The user requested (constraint) posttrain=={CORE}\n"
        "    posttrain-zzdemo 2.0 depends on posttrain>=2\n",
    )
    assert main(["install", "zzdemo"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "works with the installed core, posttrain" in err and "depends on posttrain>=2" in err
    assert "never changes the core" in err and "pip install -U posttrain" in err


def test_other_pip_failures_point_to_pips_output(fake_pip, monkeypatch, capsys):
    monkeypatch.setattr(install, "source_checkout", lambda: None)
    fake_pip.reply = (2, "ERROR: network is down\n")
    assert main(["install", "zzdemo"]) == 2
    assert "pip failed (exit code 2)" in capsys.readouterr().err


def test_no_pip_in_the_environment(monkeypatch, capsys):
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(install, "source_checkout", lambda: None)
    assert main(["install", "zzdemo"]) == 2
    err = capsys.readouterr().err
    assert "pip is not available in this environment" in err and "ensurepip" in err


# -- uninstall -------------------------------------------------------------------------------------------------


def test_uninstall_refuses_the_core_non_plugins_and_unknown_names(capsys):
    assert main(["uninstall", "posttrain", "-y"]) == 2
    assert "'posttrain' is the core" in capsys.readouterr().err
    assert main(["uninstall", "pytest", "-y"]) == 2
    assert "pytest is installed but is not a posttrain plugin" in capsys.readouterr().err
    assert main(["uninstall", "zz-nothing-at-all", "-y"]) == 2
    assert "'zz-nothing-at-all' is not installed" in capsys.readouterr().err


def test_uninstall_by_provided_name(fake_site, fake_pip, capsys):
    fake_site.add("acme-zz", methods={"zz-m": "acme_zz:M"}, module="acme_zz", code="M = 1\n")
    assert uninstall.resolve_uninstall("zz-m") == "acme-zz"
    assert main(["uninstall", "zz-m", "--dry-run", "-y"]) == 0
    assert capsys.readouterr().out.strip().endswith("pip uninstall -y acme-zz")


def test_uninstall_without_yes_needs_a_terminal(fake_site, fake_pip, monkeypatch, capsys):
    fake_site.add("acme-zz", methods={"zz-m": "acme_zz:M"}, module="acme_zz", code="M = 1\n")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["uninstall", "zz-m"]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert fake_pip.calls == []


# -- "not installed" in every command ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "zz-demo"],
        ["schema", "zz-demo"],
        ["train", "zz-demo", "--model", "x"],
        ["check-data", "zz-demo", "data.jsonl"],
    ],
)
def test_an_indexed_method_that_is_not_installed_says_what_to_install(index, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        "method 'zz-demo' is not installed; it is provided by posttrain-zzdemo: run `posttrain install zzdemo`" in err
    )
    assert "Did you mean" not in err


def test_a_third_party_provider_is_named_as_such(index):
    with pytest.raises(PluginError, match=r"provided by acme-zz-simpo \(a third-party package\)"):
        discovery.find("method", "zz-simpo")


def test_an_unknown_method_suggests_the_install_command(capsys):
    assert main(["info", "zz-nowhere"]) == 2
    assert "`posttrain install zz-nowhere`" in capsys.readouterr().err


# -- for real: a throwaway wheel in, then out ------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_install_and_uninstall_a_throwaway_wheel(tmp_path):
    name = f"posttrain-zz-throwaway-{os.getpid()}"
    method = f"zz-throwaway-{os.getpid()}"
    wheel = build_wheel(tmp_path, name, method=method)
    try:
        out = _cli("install", str(wheel))
        assert out.returncode == 0, out.stderr
        assert f"installed {name} 0.0.1: method {method} (experimental)" in out.stdout
        listed = {r["name"]: r for r in json.loads(_cli("list", "--json").stdout)}
        assert listed[method]["package"] == name and listed[method]["status"] == "experimental"
        assert discovery.core_version() == CORE
        out = _cli("uninstall", method, "--yes")
        assert out.returncode == 0, out.stderr
        assert f"uninstalled {name}" in out.stdout
        assert method not in {r["name"] for r in json.loads(_cli("list", "--json").stdout)}
    finally:  # leave the environment as it was, whatever failed above
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", name], capture_output=True)
