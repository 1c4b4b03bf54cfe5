"""``posttrain info METHOD``: package, status, docs and (importing the method) its config fields."""

from __future__ import annotations

import argparse

from posttrain import _discovery as discovery


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain info", description="Describe an installed method.")
    p.add_argument("method")
    p.add_argument("--no-import", action="store_true", help="metadata only; do not import the plugin")
    args = p.parse_args(argv)
    entry = discovery.find("method", args.method, allow_inactive=True)
    print(f"method:   {entry.name}")
    print(f"package:  {entry.package} {entry.version}")
    print(f"status:   {entry.status}")
    print(f"summary:  {entry.summary}")
    print(f"requires: posttrain{entry.requires_core or ' (any)'} (installed {discovery.core_version()})")
    print(f"provides: {entry.value}")
    if entry.docs_url:
        print(f"docs:     {entry.docs_url}")
    if args.no_import:
        return 0
    from posttrain.config import describe_fields

    method_class = discovery.load(entry)
    formats = ", ".join(getattr(method_class, "dataset_formats", ()) or ["(not declared)"])
    print(f"data:     {formats}")
    accepts = getattr(method_class, "supports_images", False) is True
    print(f"images:   {'yes: rows may carry images (vision-language models)' if accepts else 'no: text only'}")
    print(f"\nconfig fields ({method_class.config_class.__name__}):")
    for name, type_name, default, help_text in describe_fields(method_class.config_class):
        print(f"  {name:32} {type_name:28} {default!r:>14}  {help_text}")
    return 0
