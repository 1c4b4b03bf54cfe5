"""``posttrain info NAME``: package, status, docs, data formats and config fields.

For a method everything comes from metadata and the ``<method>.schema.json`` the package ships, so the
answer takes a fraction of a second and imports neither the plugin nor torch. A package without a shipped
schema (an older or third-party one) is imported instead, and the output says so.

For an environment (no method of that name), its constructor options and tools, read by importing it
(``--no-import`` shows its metadata only). A name that is neither may be a reward, a hook plugin
(``posttrain.plugins``, e.g. a tracker) or a plugin command: ``info`` then prints its package facts, and the
options it reads when it declares them (a reward's ``@reward(options=...)`` class, a hook module's ``OPTIONS``
dataclass), which needs an import.
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


def print_options(options: type, heading: str) -> None:
    """The fields of an options dataclass, as ``print_fields`` prints a config."""
    from posttrain.config import describe_fields

    print(f"\n{heading}:")
    for name, type_name, default, help_text in describe_fields(options):
        print(f"  {name:32} {type_name:28} {default!r:>14}  {help_text}")


OTHER_KINDS = ("reward", "plugin", "command")
KIND_LABEL = {"reward": "reward", "plugin": "hook plugin", "command": "command"}


def _other_entry(name: str) -> discovery.Entry | None:
    """The reward, hook plugin or command called ``name`` when there is exactly one usable such entry."""
    package = None
    if ":" in name:
        package, name = name.split(":", 1)
    for kind in OTHER_KINDS:
        matches = [e for e in discovery.discover((kind,)) if discovery.normalize(e.name) == discovery.normalize(name)]
        if package:
            matches = [e for e in matches if discovery.normalize(e.package) == discovery.normalize(package)]
        if matches:
            return discovery.find(kind, f"{package}:{name}" if package else name, matches, allow_inactive=True)
    return None


def _declared_options(entry: discovery.Entry) -> type | None:
    """The options class a reward (``@reward(options=...)``) or a hook module (``OPTIONS``) declares."""
    import dataclasses

    obj = discovery.load(entry)
    if entry.kind == "reward":
        from posttrain.rewards import options_class

        options = options_class(obj)
    else:
        options = getattr(obj, "OPTIONS", None)
    return options if isinstance(options, type) and dataclasses.is_dataclass(options) else None


def _with_other_suggestions(error: Exception, name: str) -> Exception:
    """An unknown name close to a reward, hook plugin or command name suggests that, not a look-alike method."""
    import difflib

    from posttrain._errors import PluginError

    others = {e.name: KIND_LABEL[e.kind] for e in discovery.discover(OTHER_KINDS)}
    close = difflib.get_close_matches(name, list(others), n=3, cutoff=0.75)
    if not close or not str(error).startswith("unknown method"):
        return error
    hint = " or ".join(f"{c!r} ({others[c]})" for c in close)
    return PluginError(f"no method, reward, hook plugin or command is called {name!r}. Did you mean {hint}?")


def describe_other(entry: discovery.Entry, no_import: bool, as_json: bool) -> int:
    options = None if no_import or entry.kind == "command" else _declared_options(entry)
    if as_json:
        from posttrain.config import describe_fields

        fields = (
            [{"name": n, "type": t, "default": repr(d), "help": h} for n, t, d, h in describe_fields(options)]
            if options
            else None
        )
        print(json.dumps({"entry": entry.to_dict(), "options": fields}, indent=2))
        return 0
    _header(KIND_LABEL[entry.kind], entry)
    if options is not None:
        doc = (options.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc and not doc[0].startswith(f"{options.__name__}(") else options.__name__
        print_options(options, f"options ({summary.replace('``', '`')})")
    elif no_import and entry.kind != "command":
        print("options:  not shown (--no-import)")
    return 0


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain info",
        description="Describe an installed method or environment, or a reward, hook plugin (e.g. a tracker) or "
        "plugin command.",
    )
    p.add_argument("method", metavar="NAME", help="a method or environment name; else a reward, hook plugin or command")
    p.add_argument("--no-import", action="store_true", help="never import the plugin, even without a shipped schema")
    p.add_argument("--json", action="store_true", help="print the facts and config schema (or options) as JSON")
    args = p.parse_args(argv)
    from posttrain._errors import PluginError

    entries = discovery.discover()
    provided = {(e.kind, discovery.normalize(e.name)) for e in entries}
    name = discovery.normalize(args.method.split(":")[-1])
    if ("environment", name) in provided and ("method", name) not in provided:
        entry = discovery.find("environment", args.method, entries, allow_inactive=True)
        return _environment(entry, args)
    try:
        entry = discovery.find("method", args.method, entries, allow_inactive=True)
    except PluginError as error:
        other = _other_entry(args.method)
        if other is None:
            raise _with_other_suggestions(error, args.method) from None
        return describe_other(other, args.no_import, args.json)
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
    _header("method", entry)
    if schema is None:
        print("schema:   none shipped (--no-import: config fields not shown)")
        return 0
    print(f"data:     {', '.join(facts.get('dataset_formats') or ['(not declared)'])}")
    accepts = facts.get("supports_images") is True
    print(f"images:   {'yes: rows may carry images (vision-language models)' if accepts else 'no: text only'}")
    print(f"schema:   {source}")
    print_fields(schema)
    return 0


def _header(kind: str, entry: discovery.Entry) -> None:
    print(f"{kind + ':':<9} {entry.name}")
    print(f"package:  {entry.package} {entry.version}")
    print(f"status:   {entry.status}")
    print(f"summary:  {entry.summary}")
    print(f"requires: posttrain{entry.requires_core or ' (any)'} (installed {discovery.core_version()})")
    print(f"provides: {entry.value}")
    if entry.docs_url:
        print(f"docs:     {entry.docs_url}")


def _environment(entry: discovery.Entry, args: argparse.Namespace) -> int:
    """An environment's facts; its options (``environment_kwargs``) and tools need an import, so not with
    ``--no-import``."""
    described = None
    if not args.no_import:
        from posttrain import _registry as registry

        described = describe_environment(registry._load(entry))  # a failing plugin is a one-line error
    if args.json:
        print(json.dumps({"entry": entry.to_dict(), "environment": described}, indent=2))
        return 0
    _header("environment", entry)
    if described is None:
        print("options:  not shown (--no-import; they are read by importing the environment)")
        return 0
    print(f"about:    {described['about'] or '(no docstring)'}")
    options = described["options"]
    print("\nenvironment_kwargs (constructor options):" if options else "\nenvironment_kwargs: none")
    for option in options:
        annotation = f": {option['type']}" if option["type"] else ""
        default = f" = {option['default']}" if "default" in option else ""
        print(f"  {option['name']}{annotation}{default}")
    tools = described["tools"]
    print(f"\ntools: {', '.join(t['name'] for t in tools) or 'none'}")
    for tool in tools:
        print(f"  {tool['name']}{tool['signature']}: {tool['summary']}")
    return 0


def describe_environment(env_class: type) -> dict:
    """Docstring summary, constructor options (``environment_kwargs``) and tools of an environment class."""
    import inspect

    options = []
    for p in inspect.signature(env_class).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        option = {
            "name": p.name,
            "type": "" if p.annotation is p.empty else getattr(p.annotation, "__name__", str(p.annotation)),
        }
        if p.default is not p.empty:
            option["default"] = repr(p.default)
        options.append(option)
    tools = [
        {
            "name": tool.__name__,
            "signature": str(inspect.signature(tool)),
            "summary": (inspect.getdoc(tool) or "(no docstring)").splitlines()[0],
        }
        for tool in getattr(env_class, "tools", None) or []
    ]
    return {"about": (inspect.getdoc(env_class) or "").split("\n\n")[0], "options": options, "tools": tools}
