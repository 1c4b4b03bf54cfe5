"""posttrain new: names, the generated files, and the whole lifecycle end to end in a throwaway venv."""

from __future__ import annotations

import ast
import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

from posttrain import PosttrainError
from posttrain._lifecycle import scaffold
from posttrain.cli import main

LAYOUT = [
    ".gitignore",
    "CHANGELOG.md",
    "LICENSE",
    "MANIFEST.in",
    "README.md",
    "configs/tiny.yaml",
    "data/tiny.jsonl",
    "docs/my-method.md",
    "pyproject.toml",
    "src/posttrain_my_method/__init__.py",
    "src/posttrain_my_method/config.py",
    "src/posttrain_my_method/data.py",
    "src/posttrain_my_method/loss.py",
    "src/posttrain_my_method/method.py",
    "tests/conftest.py",
    "tests/test_conformance.py",
    "tests/test_data.py",
    "tests/test_loss.py",
    "tests/test_train.py",
]


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("name", "distribution", "package", "class_name"),
    [
        ("my-method", "posttrain-my-method", "posttrain_my_method", "MyMethod"),
        ("dpo", "posttrain-dpo", "posttrain_dpo", "Dpo"),
        ("a_b2-c", "posttrain-a_b2-c", "posttrain_a_b2_c", "AB2C"),
    ],
)
def test_names(name, distribution, package, class_name):
    assert scaffold.names(name) == scaffold.Names(name, distribution, package, class_name)


@pytest.mark.parametrize("name", ["", "My-method", "1st", "-x", "my method", "méthode", "a.b"])
def test_invalid_names_are_refused(name):
    with pytest.raises(PosttrainError, match=r"\[a-z\]\[a-z0-9_-\]\*"):
        scaffold.names(name)


def test_distribution_name_given_as_method_name():
    with pytest.raises(PosttrainError, match="`posttrain new foo` creates the package posttrain-foo"):
        scaffold.names("posttrain-foo")


def test_core_range():
    assert scaffold.core_range("0.1.0") == ("0.1", "1")
    assert scaffold.core_range("1.4.2.dev3") == ("1.4", "2")


def test_generated_layout_and_metadata(tmp_path):
    root = scaffold.generate("my-method", tmp_path / "pkg", author="Ada", core_version="1.3.2", date="2026-01-01")
    assert files_of(root) == LAYOUT
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"unrendered placeholder in {path}"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "posttrain-my-method"
    assert project["version"] == "0.1.0"
    assert project["dependencies"] == ["posttrain>=1.3,<2"]
    assert project["classifiers"] == ["Development Status :: 3 - Alpha"]
    assert project["authors"] == [{"name": "Ada"}]
    assert project["entry-points"]["posttrain.methods"] == {"my-method": "posttrain_my_method:MyMethod"}
    assert project["optional-dependencies"]["test"] == ["pytest>=8"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "Copyright (c) 2026 Ada" in (root / "LICENSE").read_text()
    assert project["urls"] == {"Homepage": "https://pypi.org/project/posttrain-my-method/"}
    assert "## 0.1.0 - 2026-01-01" in (root / "CHANGELOG.md").read_text()
    assert "`posttrain new my-method --template lm`" in (root / "CHANGELOG.md").read_text()
    assert (root / "docs" / "my-method.md").read_text().startswith("---\nstatus: experimental\n---\n")


def test_generated_python_parses_and_reads_top_to_bottom(tmp_path):
    root = scaffold.generate("my-method", tmp_path / "pkg", author="", core_version="0.1.0")
    for path in root.rglob("*.py"):
        ast.parse(path.read_text(), str(path))
    source = root / "src" / "posttrain_my_method"
    assert "class MyMethodConfig(TrainingConfig)" in (source / "config.py").read_text()
    assert "def next_token_nll(" in (source / "loss.py").read_text()
    assert 'name = "my-method"' in (source / "method.py").read_text()
    assert 'conformance_suite(\n    "my-method"' in (root / "tests" / "test_conformance.py").read_text()
    assert 'tier="full"' in (root / "tests" / "test_conformance.py").read_text()
    command = (root / "configs" / "tiny.yaml").read_text().splitlines()[0]
    assert command == "# posttrain train my-method --config configs/tiny.yaml"


def test_description_and_author_are_escaped(tmp_path):
    text = 'Say "hi" \\ to ünïcode'
    root = scaffold.generate("x", tmp_path / "pkg", description=text, author='A "B"', core_version="0.1.0")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["description"] == text and project["authors"] == [{"name": 'A "B"'}]
    module = ast.parse((root / "src" / "posttrain_x" / "__init__.py").read_text())
    assert ast.get_docstring(module).startswith(text)


def test_without_author_there_is_no_authors_field(tmp_path):
    root = scaffold.generate("x", tmp_path / "pkg", author="", core_version="0.1.0")
    assert "authors" not in tomllib.loads((root / "pyproject.toml").read_text())["project"]


def test_multi_line_description_is_refused(tmp_path):
    with pytest.raises(PosttrainError, match="one non-empty line"):
        scaffold.generate("x", tmp_path / "pkg", description="two\nlines")


def test_never_overwrites(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(PosttrainError, match="never overwrites"):
        scaffold.generate("x", tmp_path / "taken")
    assert files_of(tmp_path / "taken") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert files_of(scaffold.generate("x", tmp_path / "empty", author="")) != []


def test_unknown_placeholder_is_an_error():
    with pytest.raises(KeyError, match="unknown placeholder"):
        scaffold.render("{{name}} {{nope}}", {"name": "x"})


@pytest.mark.parametrize("template", scaffold.template_names())
@pytest.mark.parametrize("name", ["my-method", "preference-method-with-long-name"])
def test_generated_code_is_ruff_clean_with_its_own_config(tmp_path, template, name):
    """`ruff check` and `ruff format --check` pass with the package's own [tool.ruff] (no project config)."""
    pytest.importorskip("ruff")
    root = scaffold.generate(name, tmp_path / "pkg", author="", core_version="0.1.0", template=template)
    for command in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "line-length = 120" in (root / "pyproject.toml").read_text()


PREFERENCE_SOURCES = ["__init__.py", "config.py", "data.py", "loss.py", "method.py"]


def test_preference_template(tmp_path):
    root = scaffold.generate("pair-method", tmp_path / "pkg", author="", core_version="1.0", template="preference")
    assert files_of(root) == sorted(
        f.replace("my-method", "pair-method").replace("my_method", "pair_method") for f in LAYOUT
    )
    source = root / "src" / "posttrain_pair_method"
    assert "def dpo_loss(" in (source / "loss.py").read_text()
    method = (source / "method.py").read_text()
    assert "self.ref_model = reference_model(ctx)" in method and "reference_forward(model, self.ref_model)" in method
    assert "Context = TrainContext[PairMethodConfig]" in method
    assert '"chosen"' in (root / "data" / "tiny.jsonl").read_text()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["description"] == "pair-method: a pairwise preference loss against a frozen reference model."


ONLINE_LAYOUT = sorted(
    [
        *(f for f in LAYOUT if not f.endswith("/data.py")),
        "src/posttrain_my_method/rewards.py",
        "tests/test_rewards.py",
        "tests/test_rollout.py",
    ]
)


def test_online_template(tmp_path):
    root = scaffold.generate("my-method", tmp_path / "pkg", author="", core_version="1.0", template="online")
    assert files_of(root) == ONLINE_LAYOUT
    source = root / "src" / "posttrain_my_method"
    assert "def leave_one_out_advantages(" in (source / "loss.py").read_text()
    assert "def reinforce_loss(" in (source / "loss.py").read_text()
    method = (source / "method.py").read_text()
    for call in ("RewardSet.resolve(", "build_generator(ctx)", "sample(self.generator", "def rollout(self, model"):
        assert call in method, call
    assert "@reward(options=AnswerOptions)" in (source / "rewards.py").read_text()
    assert '"answer"' in (root / "data" / "tiny.jsonl").read_text()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["posttrain.rewards"] == {
        "my-method-answer": "posttrain_my_method.rewards:answer_reward"
    }
    assert project["description"] == "my-method: online RL on prompts, REINFORCE with a leave-one-out baseline."
    assert "reward_funcs: [my-method-answer]" in (root / "configs" / "tiny.yaml").read_text()


def test_online_pyproject_is_the_common_one_plus_the_reward_entry_point():
    """The online template carries its own pyproject.toml (for the reward's entry point): it must not drift."""
    files = dict(scaffold.template_files("online"))
    common = dict(scaffold.template_files("lm"))["pyproject.toml.tmpl"]
    online = files["pyproject.toml.tmpl"].splitlines(keepends=True)
    added = [line for line in online if line not in common.splitlines(keepends=True)]
    assert added == [
        '[project.entry-points."posttrain.rewards"]\n',
        '{{name}}-answer = "{{package}}.rewards:answer_reward"  # the example reward: `--reward_funcs {{name}}-answer`\n',
    ]
    assert "".join(line for line in online if line not in added).replace("\n\n\n", "\n\n") == common


def test_unknown_template_is_refused(tmp_path):
    with pytest.raises(
        PosttrainError, match="unknown template 'environment': the templates are lm, online, preference"
    ):
        scaffold.generate("x", tmp_path / "pkg", template="environment")


def test_a_template_is_one_folder(tmp_path, monkeypatch):
    """Adding a template (environment, ...) is adding a folder with template.json beside common/."""
    templates = Path(scaffold.__file__).parent / "templates"
    assert sorted(p.name for p in templates.iterdir() if p.is_dir()) == ["common", *scaffold.template_names()]
    for name in scaffold.template_names():
        info = scaffold.template_info(name)
        assert set(info) == {"summary", "description"} and "{name}" in info["description"]


def test_sdist_carries_what_the_tests_need(tmp_path):
    """Tests, configs, data, docs and the license are in the sdist, and the unit tests run from it."""
    import tarfile

    root = scaffold.generate("sd-method", tmp_path / "pkg", author="", core_version="0.1.0")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    archive = dist / build.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    for required in [
        "tests/conftest.py",
        "tests/test_conformance.py",
        "tests/test_loss.py",
        "tests/test_train.py",
        "configs/tiny.yaml",
        "data/tiny.jsonl",
        "docs/sd-method.md",
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
    ]:
        assert required in names, f"{required} is not in the sdist: {sorted(names)}"
    assert not any("__pycache__" in n for n in names)
    unpacked = next((tmp_path / "unpacked").iterdir())
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_loss.py", "tests/test_data.py"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(unpacked / "src")},
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr[-2000:]


def test_cli_new(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new", "my-method", "--description", "Mine.", "--author", "Ada"]) == 0
    out = capsys.readouterr().out
    assert "Created posttrain-my-method (lm template) in posttrain-my-method/ (19 files)" in out
    assert "posttrain train my-method --config configs/tiny.yaml" in out
    assert "pip install -e '.[test]'" in out and "'Write before promotion:'" in out
    assert files_of(tmp_path / "posttrain-my-method") == LAYOUT
    assert main(["new", "my-method"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["new", "Bad"]) == 2
    assert main(["new", "other", "--directory", "elsewhere/pkg", "--author", ""]) == 0
    assert (tmp_path / "elsewhere" / "pkg" / "pyproject.toml").is_file()
    assert main(["new", "pairs", "--template", "preference", "--url", "https://example.org/pairs"]) == 0
    assert "(preference template)" in capsys.readouterr().out
    assert main(["new", "rl", "--template", "online", "--author", ""]) == 0
    out = capsys.readouterr().out
    assert "(online template)" in out and "(config.py, loss.py, method.py, rewards.py)" in out
    urls = tomllib.loads((tmp_path / "posttrain-pairs" / "pyproject.toml").read_text())["project"]["urls"]
    assert urls == {"Homepage": "https://example.org/pairs"}
    assert main(["new", "bad-url", "--url", "not a url"]) == 2


# -- end to end --------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".egg-info" not in str(p) and "__pycache__" not in str(p)
    }


@pytest.fixture
def venv(tmp_path) -> Path:
    """A venv on top of this one: it sees torch, posttrain and pip through a .pth file, installs into itself."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "_posttrain_parent_venv.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    )
    return python


PARITY_SCRIPT = """
from pathlib import Path

from posttrain.testing.parity import write_result

# a stand-in for a real comparison: the same two losses from "both implementations"
write_result(
    Path(__file__).parent / "result.json",
    method="my-method",
    reference="the reference implementation 1.0",
    compared="per-step training loss, 2 steps",
    tolerance=1e-4,
    comparisons={"default": ([4.6, 4.5], [4.6, 4.5])},
)
"""


@pytest.mark.slow
def test_new_install_train_promote_end_to_end(venv, tmp_path):
    """new -> pip install -> list (experimental) -> train warns -> promote refuses the scaffold's docs and a missing
    result, changing nothing -> the author writes the docs and a parity script -> promote --run-parity (measuring,
    then running the package's own tests and the kit) -> reinstall -> list (stable) -> train silent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTTRAIN_", "PYTHONPATH"))}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and kind to a busy machine

    def run(*args, cwd=tmp_path):
        out = subprocess.run(
            [str(venv), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
        )
        return out

    def posttrain(*args):
        return run("-m", "posttrain", *args)

    def listed() -> dict:
        out = posttrain("list", "--json")
        assert out.returncode == 0, out.stderr
        return {e["name"]: e for e in json.loads(out.stdout)}

    pkg = tmp_path / "posttrain-my-method"
    out = posttrain("new", "my-method", "--description", "My method, end to end.", "--author", "Test")
    assert out.returncode == 0, out.stderr
    install = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", pkg)
    out = run(*install)
    assert out.returncode == 0, out.stdout + out.stderr
    entry = listed()["my-method"]
    assert (entry["status"], entry["version"], entry["package"]) == ("experimental", "0.1.0", "posttrain-my-method")

    from posttrain.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}: the cat sat on the mat."}) + "\n" for i in range(8)))
    train = (
        "train",
        "my-method",
        "--model",
        model,
        "--dataset",
        data,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "0",
        "--disable_progress_bar",
        "true",
    )
    out = posttrain(*train, "--output_dir", tmp_path / "run-experimental")
    assert out.returncode == 0, out.stderr
    assert "ExperimentalWarning" in out.stderr and "'my-method'" in out.stderr
    assert "done: 2 steps" in out.stderr and (tmp_path / "run-experimental" / "metrics.jsonl").is_file()

    before = tree(pkg)
    out = posttrain("promote", pkg, "--dry-run")  # the scaffold's docs and no measured result: refused
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[FAIL] README and docs page" in out.stdout and "[FAIL] parity or benchmark result" in out.stdout
    assert "[ok]   conformance kit green at tier full: 1 kit suite(s), 12 checks" in out.stdout  # run here, really
    assert tree(pkg) == before

    for path in (pkg / "README.md", pkg / "docs" / "my-method.md"):  # the author writes their sections
        path.write_text(
            re.sub(r"^> \*\*Write before promotion:\*\*.*?(?=\n(?!>))", "Written.", path.read_text(), flags=re.M | re.S)
        )
    (pkg / "parity").mkdir()
    (pkg / "parity" / "parity_my_method.py").write_text(PARITY_SCRIPT)
    out = posttrain("promote", pkg, "--run-parity")  # the script measures, then the package's own tests run
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ran parity/parity_my_method.py: exit 0" in out.stdout
    assert "[ok]   conformance kit green at tier full: 1 kit suite(s), 12 checks" in out.stdout
    assert "Promoted to stable: posttrain-my-method 1.0.0." in out.stdout
    assert (pkg / "PROMOTION.md").is_file() and (pkg / "promotion.json").is_file()
    from posttrain._lifecycle import promotion

    assert promotion.verify_record(pkg) == []

    out = run(*install)
    assert out.returncode == 0, out.stdout + out.stderr
    entry = listed()["my-method"]
    assert (entry["status"], entry["version"]) == ("stable", "1.0.0")
    out = posttrain(*train, "--output_dir", tmp_path / "run-stable")
    assert out.returncode == 0, out.stderr
    assert "ExperimentalWarning" not in out.stderr and "experimental" not in out.stderr
