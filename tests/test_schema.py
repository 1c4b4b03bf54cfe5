"""``posttrain schema`` and the schema files packages ship; ``posttrain info`` answering from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import tomllib
from posttrain import _discovery as discovery
from posttrain.cli import main
from posttrain.cli import schema as schema_lib

ROOT = Path(__file__).resolve().parents[1]
FIX = "posttrain schema --all --write"


def shipped_methods() -> list[tuple[str, str, Path]]:
    """(method, entry-point value, schema file) for every method of this repository's plugins."""
    out = []
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for name, value in project.get("entry-points", {}).get("posttrain.methods", {}).items():
            package = value.split(":")[0].split(".")[0]
            out.append((name, value, pyproject.parent / "src" / package / f"{name}.schema.json"))
    return out


@dataclass
class ToyConfig:
    """Toy options."""

    name: str = "x"  # what it is called
    steps: int = 3
    rate: float = 1e-3  # how fast
    flag: bool = False
    kind: Literal["a", "b"] = "a"  # one of two
    maybe: int | None = None
    tags: list[str] = field(default_factory=lambda: ["t"])
    weights: list[float] | None = None
    extra: dict = field(default_factory=dict)


class Toy:
    config_class = ToyConfig
    dataset_formats = ("language_modeling",)


def test_schema_of_a_config_dataclass():
    schema = schema_lib.config_schema(Toy, "toy")
    props = schema["properties"]
    assert schema["$schema"] == schema_lib.JSON_SCHEMA and schema["additionalProperties"] is False
    assert schema["title"] == "ToyConfig" and schema["description"].endswith("Toy options.")
    assert schema["x-posttrain"]["dataset_formats"] == ["language_modeling"]
    assert props["method"] == {"const": "toy", "description": props["method"]["description"]}
    assert props["name"] == {"type": "string", "description": "what it is called", "default": "x"}
    assert props["steps"] == {"type": "integer", "default": 3}
    assert props["rate"] == {"type": "number", "description": "how fast", "default": 1e-3}
    assert props["flag"] == {"type": "boolean", "default": False}
    assert props["kind"] == {"type": "string", "enum": ["a", "b"], "description": "one of two", "default": "a"}
    assert props["maybe"] == {"type": ["integer", "null"], "default": None}
    comma = {"type": "string", "description": "comma-separated items"}
    assert props["tags"] == {"anyOf": [{"type": "array", "items": {"type": "string"}}, comma], "default": ["t"]}
    assert props["weights"] == {
        "anyOf": [{"type": "array", "items": {"type": "number"}}, comma, {"type": "null"}],
        "default": None,
    }
    assert props["extra"] == {"type": "object", "default": {}}


@pytest.mark.parametrize("method, value, path", shipped_methods(), ids=lambda v: v if isinstance(v, str) else "")
def test_shipped_schema_is_up_to_date(method, value, path):
    """Each plugin ships <method>.schema.json equal to what its config generates today."""
    entry = discovery.find("method", method, allow_inactive=True)
    assert entry.value == value
    expected = schema_lib.dumps(schema_lib.generate(entry))
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing; create it with `{FIX}`"
    assert path.read_text() == expected, f"{path.relative_to(ROOT)} is stale; regenerate it with `{FIX}`"
    assert schema_lib.shipped_path(entry) == path  # the file is where `posttrain info` looks


def test_shipped_yaml_configs_validate_against_their_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="validating YAML against the schemas needs jsonschema")
    import yaml

    checked = 0
    for _method, _value, path in shipped_methods():
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        for config in sorted(path.parents[2].glob("configs/*.yaml")):
            jsonschema.validate(yaml.safe_load(config.read_text()), schema)
            checked += 1
        with pytest.raises(jsonschema.ValidationError, match="learning_rat"):
            jsonschema.validate({"learning_rat": 1e-3}, schema)  # a typo is caught in the editor
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"max_steps": "many"}, schema)
    assert checked >= 10


def test_schema_command_prints_the_shipped_schema(capsys):
    assert main(["schema", "dpo"]) == 0
    printed = capsys.readouterr().out
    assert printed == (ROOT / "plugins/posttrain-dpo/src/posttrain_dpo/dpo.schema.json").read_text()
    assert json.loads(printed)["properties"]["beta"]["default"] == 0.1
    assert main(["schema", "dpo", "--generate"]) == 0
    assert capsys.readouterr().out == printed


def test_schema_command_writes_a_file(tmp_path, capsys):
    assert main(["schema", "sft", "-o", str(tmp_path / "sft.json")]) == 0
    assert json.loads((tmp_path / "sft.json").read_text())["title"] == "SFTConfig"
    assert main(["schema", "sft", "dpo"]) == 2
    assert "one schema is printed at a time" in capsys.readouterr().err


# -- info without importing ----------------------------------------------------------------------------------

TOY_SCHEMA = {
    "title": "HeavyConfig",
    "properties": {
        "method": {"const": "zz-heavy"},
        "learning_rate": {"type": "number", "default": 0.001, "description": "step size"},
        "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
    },
    "x-posttrain": {"method": "zz-heavy", "dataset_formats": ["preference"]},
}

PROBE = textwrap.dedent(
    """
    import sys, time
    start = time.perf_counter()
    from posttrain.cli import main
    code = main(["info", sys.argv[1]])
    print("SECONDS", round(time.perf_counter() - start, 3))
    print("IMPORTED", [m for m in ("torch", "transformers", "pluggy", "yaml", "rich", sys.argv[2]) if m in sys.modules])
    sys.exit(code)
    """
)


def test_info_answers_from_the_shipped_schema_without_importing(fake_site):
    fake_site.add(
        "pt-heavy",
        methods={"zz-heavy": "pt_heavy:Method"},
        module="pt_heavy",
        code="raise RuntimeError('imported!')\n",
        summary="A heavy method",
    )
    (fake_site.root / "zz-heavy.schema.json").write_text(json.dumps(TOY_SCHEMA))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "zz-heavy", "pt_heavy"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert "data:     preference" in out.stdout and "(shipped with pt-heavy)" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("mode"))
    assert "'fast' | 'slow'" in line and "'fast'" in line
    assert "step size" in out.stdout


def test_info_of_a_real_plugin_imports_neither_it_nor_torch():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "dpo", "posttrain_dpo"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert "beta" in out.stdout and "config fields (DPOConfig)" in out.stdout
    seconds = float(next(line for line in out.stdout.splitlines() if line.startswith("SECONDS")).split()[1])
    print(f"posttrain info dpo: {seconds:.3f} s in-process")


def test_info_without_a_shipped_schema_imports_and_says_so(fake_site, toy_method_source, capsys):
    fake_site.add("posttrain-toy", methods={"toy": "pt_toy_info:Toy"}, module="pt_toy_info", code=toy_method_source)
    assert main(["info", "toy"]) == 0
    captured = capsys.readouterr()
    assert "ships no toy.schema.json" in captured.err and "importing the plugin" in captured.err
    assert "max_length" in captured.out and "tokens per row" in captured.out
    assert main(["info", "toy", "--no-import"]) == 0
    assert "none shipped" in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "dpo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entry"]["package"] == "posttrain-dpo" and data["schema"]["title"] == "DPOConfig"


HOOK_WITH_OPTIONS = '''
from dataclasses import dataclass


@dataclass
class ShipOptions:
    """Options of the zz-ship hook plugin."""

    endpoint: str = "http://127.0.0.1:9000"  # where metrics are shipped
    retries: int = 3  # attempts per row


OPTIONS = ShipOptions
'''


def test_info_describes_a_hook_plugin_and_its_declared_options(fake_site, capsys):
    """`posttrain info NAME` also answers for a hook plugin (a tracker, say), listing its OPTIONS dataclass."""
    fake_site.add("pt-ship", plugins={"zz-ship": "pt_ship"}, module="pt_ship", code=HOOK_WITH_OPTIONS)
    assert main(["info", "zz-ship"]) == 0
    out = capsys.readouterr().out
    assert "hook plugin: zz-ship" in out and "package:  pt-ship 1.0.0" in out
    assert "options (Options of the zz-ship hook plugin.)" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("retries"))
    assert "int" in line and "3" in line and "attempts per row" in line
    assert main(["info", "zz-ship", "--no-import"]) == 0
    assert "options:  not shown (--no-import)" in capsys.readouterr().out
    assert main(["info", "zz-ship", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["entry"]["kind"] == "plugin" and [f["name"] for f in facts["options"]] == ["endpoint", "retries"]


def test_info_suggests_a_close_hook_plugin_name_over_a_look_alike_method(fake_site, capsys):
    fake_site.add("pt-ship", plugins={"zz-ship": "pt_ship"}, module="pt_ship", code=HOOK_WITH_OPTIONS)
    assert main(["info", "zz-shipp"]) == 2
    assert "Did you mean 'zz-ship' (hook plugin)?" in capsys.readouterr().err
