"""``posttrain info NAME``: package, status, docs and (importing the method) its config fields; for an
environment (no method of that name), its constructor options and tools."""

from __future__ import annotations

import argparse

from posttrain import _discovery as discovery


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain info", description="Describe an installed method or environment.")
    p.add_argument("method")
    p.add_argument("--no-import", action="store_true", help="metadata only; do not import the plugin")
    args = p.parse_args(argv)
    entries = discovery.discover()
    provided = {(e.kind, e.name) for e in entries}
    name = args.method.split(":")[-1]
    kind = "environment" if ("environment", name) in provided and ("method", name) not in provided else "method"
    entry = discovery.find(kind, args.method, [e for e in entries if e.kind == kind], allow_inactive=True)
    print(f"{kind + ':':<9} {entry.name}")
    print(f"package:  {entry.package} {entry.version}")
    print(f"status:   {entry.status}")
    print(f"summary:  {entry.summary}")
    print(f"requires: posttrain{entry.requires_core or ' (any)'} (installed {discovery.core_version()})")
    print(f"provides: {entry.value}")
    if entry.docs_url:
        print(f"docs:     {entry.docs_url}")
    if args.no_import:
        return 0
    if kind == "environment":
        from posttrain import _registry as registry

        return _describe_environment(registry._load(entry))  # a failing plugin is a one-line error
    from posttrain import _registry as registry
    from posttrain.config import describe_fields

    method_class = registry.load_method(entry)  # a failing or non-conforming plugin is a one-line error
    formats = ", ".join(getattr(method_class, "dataset_formats", ()) or ["(not declared)"])
    print(f"data:     {formats}")
    print(f"\nconfig fields ({method_class.config_class.__name__}):")
    for name, type_name, default, help_text in describe_fields(method_class.config_class):
        print(f"  {name:32} {type_name:28} {default!r:>14}  {help_text}")
    return 0


def _describe_environment(env_class: type) -> int:
    """Constructor options (``environment_kwargs``) and tools of an environment class."""
    import inspect

    doc = (inspect.getdoc(env_class) or "").split("\n\n")[0]
    print(f"about:    {doc}" if doc else "about:    (no docstring)")
    params = [p for p in inspect.signature(env_class).parameters.values() if p.name != "self"]
    print("\nenvironment_kwargs (constructor options):" if params else "\nenvironment_kwargs: none")
    for p in params:
        default = "" if p.default is p.empty else f" = {p.default!r}"
        annotation = "" if p.annotation is p.empty else f": {getattr(p.annotation, '__name__', p.annotation)}"
        print(f"  {p.name}{annotation}{default}")
    tools = getattr(env_class, "tools", None) or []
    print(f"\ntools: {', '.join(t.__name__ for t in tools) or 'none'}")
    for tool in tools:
        summary = (inspect.getdoc(tool) or "(no docstring)").splitlines()[0]
        print(f"  {tool.__name__}{inspect.signature(tool)}: {summary}")
    return 0
