"""``posttrain info METHOD``: package, status, docs, data formats and config fields.

Everything comes from metadata and the ``<method>.schema.json`` the package ships, so the answer
takes a fraction of a second and imports neither the plugin nor torch. A package without a shipped
schema (an older or third-party one) is imported instead, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import sys

from posttrain import _discovery as discovery


def _type_label(prop: dict) -> str:
    """A short type for a schema property: ``integer``, ``number | null``, ``'a' | 'b'``, ``list[string]``."""
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    if "anyOf" in prop:
        labels = [_type_label(p) for p in prop["anyOf"] if p.get("description") != "comma-separated items"]
        return " | ".join(labels)
    if prop.get("type") == "array":
        items = prop.get("items")
        return f"list[{_type_label(items)}]" if items else "list"
    kind = prop.get("type", "any")
    return " | ".join(kind) if isinstance(kind, list) else kind


def print_fields(schema: dict) -> None:
    print(f"\nconfig fields ({schema.get('title', '?')}):")
    for name, prop in schema.get("properties", {}).items():
        if name == "method":
            continue
        default = repr(prop["default"]) if "default" in prop else "(required)"
        print(f"  {name:32} {_type_label(prop):28} {default:>14}  {prop.get('description', '')}")


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain info", description="Describe an installed method.")
    p.add_argument("method")
    p.add_argument("--no-import", action="store_true", help="never import the plugin, even without a shipped schema")
    p.add_argument("--json", action="store_true", help="print the method's facts and config schema as JSON")
    args = p.parse_args(argv)
    entry = discovery.find("method", args.method, allow_inactive=True)
    from posttrain.cli import schema as schema_lib

    schema, path = schema_lib.read_shipped(entry)
    source = f"{path} (shipped with {entry.package})" if schema is not None else ""
    if schema is None and not args.no_import:
        print(
            f"note: {entry.package} {entry.version} ships no {entry.name}.schema.json, so its config is read by "
            f"importing the plugin (slower; `posttrain schema {entry.name} --write` in its source tree adds the file).",
            file=sys.stderr,
        )
        schema = schema_lib.generate(entry)
        source = "built by importing the plugin"
    facts = schema.get("x-posttrain", {}) if schema else {}
    if args.json:
        print(json.dumps({"entry": entry.to_dict(), "schema": schema}, indent=2))
        return 0
    print(f"method:   {entry.name}")
    print(f"package:  {entry.package} {entry.version}")
    print(f"status:   {entry.status}")
    print(f"summary:  {entry.summary}")
    print(f"requires: posttrain{entry.requires_core or ' (any)'} (installed {discovery.core_version()})")
    print(f"provides: {entry.value}")
    if entry.docs_url:
        print(f"docs:     {entry.docs_url}")
    if schema is None:
        print("schema:   none shipped (--no-import: config fields not shown)")
        return 0
    print(f"data:     {', '.join(facts.get('dataset_formats') or ['(not declared)'])}")
    accepts = facts.get("supports_images") is True
    print(f"images:   {'yes: rows may carry images (vision-language models)' if accepts else 'no: text only'}")
    print(f"schema:   {source}")
    print_fields(schema)
    return 0
