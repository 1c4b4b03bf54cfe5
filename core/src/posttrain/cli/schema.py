"""``posttrain schema METHOD``: the JSON Schema of a method's config, and the copy each package ships.

The schema is built from the config dataclass: JSON types from the annotations, ``enum`` from
``Literal``, defaults from the field defaults and descriptions from the fields' trailing comments
(:func:`posttrain.config.describe_fields`). Editors validate a ``run.yaml`` with it, e.g. with the
yaml-language-server comment ``# yaml-language-server: $schema=dpo.schema.json``.

Each package ships ``<method>.schema.json`` beside the module its entry point names, so
``posttrain info`` can describe a method's fields from the file alone, without importing the plugin
(or torch). ``posttrain schema METHOD --write`` regenerates that file; the repository's tests
fail while a shipped schema is stale.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from posttrain import _discovery as discovery
from posttrain._errors import PosttrainError

JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"


# -- building a schema from a config dataclass (imports the plugin) ----------------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "null"


def type_schema(hint: Any) -> dict:
    """JSON Schema for one annotation; what the config loader accepts, no more and no less where it can."""
    import types
    import typing
    from pathlib import PurePath

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = []
        for arg in (a for a in args if a is not type(None)):
            option = type_schema(arg)
            options += option["anyOf"] if set(option) == {"anyOf"} else [option]  # flat: one level of anyOf
        if type(None) in args:
            options.append({"type": "null"})
        if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if origin is typing.Literal:
        kinds = sorted({_json_type(a) for a in args})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        items = [a for a in args if a is not Ellipsis]
        array = {"type": "array", "items": type_schema(items[0])} if items else {"type": "array"}
        # the loader also reads a comma-separated string ("a,b") as a list
        return {"anyOf": [array, {"type": "string", "description": "comma-separated items"}]}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str or (isinstance(hint, type) and issubclass(hint, PurePath)):
        return {"type": "string"}
    return {}  # anything else: no constraint rather than a wrong one


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; no default is better than an invalid one
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_schema(method_class: Any, method_name: str) -> dict:
    """The JSON Schema of ``method_class.config_class``, with posttrain facts under ``x-posttrain``."""
    import dataclasses
    import typing

    from posttrain.config import describe_fields

    config_class = method_class.config_class
    hints = typing.get_type_hints(config_class)
    described = {name: (default, help_text) for name, _type, default, help_text in describe_fields(config_class)}
    properties: dict[str, dict] = {
        "method": {
            "const": method_name,
            "description": "the method this file is for; saved configs record it, and loading ignores it",
        }
    }
    for f in dataclasses.fields(config_class):
        default, help_text = described[f.name]
        prop = type_schema(hints[f.name])
        if help_text:
            prop["description"] = help_text
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            prop["default"] = _jsonable(default)
        properties[f.name] = prop
    doc = (config_class.__doc__ or "").strip().splitlines()
    summary = doc[0] if doc and not doc[0].startswith(f"{config_class.__name__}(") else ""
    return {
        "$schema": JSON_SCHEMA,
        "title": config_class.__name__,
        "description": f"Config of the posttrain method {method_name!r} (`posttrain train {method_name} --config "
        f"run.yaml`). {summary}".strip(),
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "x-posttrain": {
            "method": method_name,
            "config_class": f"{config_class.__module__}.{config_class.__qualname__}",
            "dataset_formats": list(getattr(method_class, "dataset_formats", ()) or ()),
            "supports_images": getattr(method_class, "supports_images", False) is True,
            "regenerate": f"posttrain schema {method_name} --write",
        },
    }


def dumps(schema: dict) -> str:
    """The exact text a shipped schema file holds (stable, so a test can compare it byte for byte)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# -- the shipped copy (no import) ----------------------------------------------------------------------------


def shipped_path(entry: discovery.Entry) -> Path | None:
    """Where ``entry``'s package keeps ``<method>.schema.json``: beside the module its entry point names.

    Found with ``importlib.util.find_spec`` on the top-level package and plain path steps below it, so
    nothing is imported. None when the module cannot be located.
    """
    parts = entry.value.partition(":")[0].split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        base = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin and spec.origin not in ("built-in", "frozen"):
        base = Path(spec.origin).parent  # a single-file module: the schema sits beside it
    else:
        return None
    for part in parts[1:]:
        if (base / part).is_dir():
            base = base / part
        elif not (base / f"{part}.py").is_file():
            return None
    return base / f"{entry.name}.schema.json"


def read_shipped(entry: discovery.Entry) -> tuple[dict | None, Path | None]:
    """(schema, path) of the shipped file; (None, path) when the package ships none or it is unreadable."""
    path = shipped_path(entry)
    if path is None or not path.is_file():
        return None, path
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError):
        return None, path


def generate(entry: discovery.Entry) -> dict:
    """Import the method (no experimental warning: nothing is trained) and build its schema.

    A plugin that fails to import or breaks the Method protocol is a one-line PluginError.
    """
    from posttrain import _registry as registry

    return config_schema(registry.load_method(entry), entry.name)


# -- the command -------------------------------------------------------------------------------------------


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain schema",
        description="Print the JSON Schema of a method's config, for editors that validate run.yaml "
        "(# yaml-language-server: $schema=FILE). Uses the schema the package ships; imports the method "
        "when it ships none.",
    )
    p.add_argument("methods", nargs="*", metavar="METHOD")
    p.add_argument("--all", action="store_true", help="every installed method")
    p.add_argument("-o", "--output", type=Path, help="write the schema to this file instead of printing it")
    p.add_argument(
        "--write", action="store_true", help="regenerate the schema file the package ships (beside its module)"
    )
    p.add_argument("--generate", action="store_true", help="import the method and build the schema, even if shipped")
    args = p.parse_args(argv)
    if args.all:
        entries = [e for e in discovery.discover(("method",)) if e.usable]
    elif args.methods:
        entries = [discovery.find("method", name, allow_inactive=True) for name in args.methods]
    else:
        p.error("give a METHOD (or --all)")
    if len(entries) > 1 and not args.write:
        raise PosttrainError(
            f"{len(entries)} methods given, but one schema is printed at a time; give one METHOD, or add --write to "
            "regenerate each package's shipped file."
        )
    for entry in entries:
        if args.write:
            path = shipped_path(entry)
            if path is None:
                raise PosttrainError(
                    f"cannot locate the module of {entry.name!r} ({entry.value}) in {entry.package}; reinstall it."
                )
            text = dumps(generate(entry))
            old = path.read_text() if path.is_file() else None
            if old != text:
                path.write_text(text)
            print(f"{'unchanged' if old == text else 'wrote'} {path}", file=sys.stderr)
            continue
        schema = None if args.generate else read_shipped(entry)[0]
        if schema is None:
            if not args.generate:
                print(
                    f"note: {entry.package} {entry.version} ships no {entry.name}.schema.json; importing the method "
                    "to build it (slower).",
                    file=sys.stderr,
                )
            schema = generate(entry)
        if args.output:
            args.output.write_text(dumps(schema))
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(dumps(schema))
    return 0
