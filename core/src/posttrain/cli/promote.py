"""``posttrain promote [NAME_OR_PATH]`` and ``posttrain demote [--retire] [NAME_OR_PATH]``.

Promote checks the promotion criteria (docs/promotion.md) and changes the package only when all
hold; demote and retire need no criteria. The logic lives in :mod:`posttrain._lifecycle.promotion`.
"""

from __future__ import annotations

import argparse
import sys

TARGET_HELP = (
    "the package's source directory, or a method NAME (plugins/posttrain-NAME here or above, or the "
    "source of an editable install); default: the package whose tree holds the working directory"
)


def promote_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain promote",
        description="Check the promotion criteria (conformance kit green at tier full, run here; tests; README and "
        "docs page written by the author; a measured parity or benchmark result for the current source; a "
        "changelog) and, when all hold, mark the package stable: Development Status 5 - Production/Stable, next "
        "major version, CHANGELOG entry, docs page status, PROMOTION.md and promotion.json. Exit code 1 and no "
        "change when a criterion fails.",
    )
    p.add_argument("target", nargs="?", metavar="NAME_OR_PATH", help=TARGET_HELP)
    p.add_argument(
        "--run-parity",
        action="store_true",
        help="run the package's parity or benchmark script first ([tool.posttrain] parity-script, else "
        "parity/*.py), so parity/result.json is measured on the current source",
    )
    p.add_argument("--docs-page", metavar="PATH", help="the method's docs page, when it is not found on its own")
    p.add_argument("--note", metavar="TEXT", help="why now (usage, maintainers); goes into the record and CHANGELOG")
    p.add_argument("--dry-run", action="store_true", help="check and show what would change, without changing it")
    return p


def demote_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain demote",
        description="Deprecate a stable package (Development Status 4 - Beta: experimental again, warns when used), "
        "or retire any package with --retire (7 - Inactive: hidden, refused for training unless forced). Bumps the "
        "minor version, adds a CHANGELOG entry, moves the docs page and appends to the promotion record.",
    )
    p.add_argument("target", nargs="?", metavar="NAME_OR_PATH", help=TARGET_HELP)
    p.add_argument("--retire", action="store_true", help="retire the package (7 - Inactive) instead of deprecating it")
    p.add_argument("--reason", metavar="TEXT", help="why (and what replaces it); goes into the record and CHANGELOG")
    p.add_argument("--docs-page", metavar="PATH", help="the method's docs page, when it is not found on its own")
    p.add_argument("--dry-run", action="store_true", help="show what would change, without changing it")
    return p


def _show_changes(pkg, changes, dry_run: bool) -> None:
    from posttrain._lifecycle.promotion import display_path

    if dry_run:
        print("\nDry run: nothing was changed. It would write:")
        for c in changes:
            if c.before is None:
                print(f"\n--- create {display_path(c.path, pkg.root)} ({len(c.after.splitlines())} lines): {c.what}")
            else:
                print("\n" + c.diff(pkg.root).rstrip("\n"))
        return
    for c in changes:
        print(f"  {c.what}" if c.before is not None else f"  {c.what} (new)")


def _reinstall_hint(pkg) -> None:
    from importlib import metadata

    from posttrain._lifecycle.promotion import install_source

    try:
        source = install_source(metadata.distribution(pkg.distribution))
    except metadata.PackageNotFoundError:
        return
    if source is not None and source.resolve() == pkg.root:
        print(
            f"\nThe installed metadata (what `posttrain list` shows) was copied at install time; refresh it with:\n"
            f"  {sys.executable} -m pip install --no-deps -e {pkg.root}"
        )


def _run_parity(pkg) -> None:
    from posttrain._lifecycle import promotion

    scripts = promotion.parity_scripts(pkg)
    if not scripts:
        print("  --run-parity: no parity script ([tool.posttrain] parity-script, or parity/*.py)")
    for script, proc in promotion.run_parity(pkg):
        shown = promotion.display_path(script, pkg.root)
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        print(f"  ran {shown}: exit {proc.returncode}" + (f" ({tail})" if proc.returncode else ""), flush=True)


def run(command: str, argv: list[str]) -> int:
    from posttrain._discovery import DOCS_PROMOTION
    from posttrain._lifecycle import promotion

    args = (promote_parser() if command == "promote" else demote_parser()).parse_args(argv)
    action = "promote" if command == "promote" else "retire" if args.retire else "demote"
    pkg = promotion.read_package(promotion.find_package(args.target))
    promotion.check_preconditions(pkg, action)
    page, looked = promotion.docs_page(pkg, args.docs_page)
    declared = promotion.STATUS.get(pkg.level or 0, "none")
    print(f"posttrain {command}: {pkg.distribution} {pkg.version} (Development Status :: {declared}) at {pkg.root}")
    criteria = None
    if action == "promote":
        if args.run_parity:
            _run_parity(pkg)
        criteria = promotion.check_criteria(
            pkg,
            page,
            looked,
            on_kit_start=lambda: print(
                "  running the package's tests with the conformance kit (pytest tests) ...", flush=True
            ),
        )
        for c in criteria:
            print(f"  {'[ok]  ' if c.passed else '[FAIL]'} {c.title}: {c.detail}")
        failed = [c for c in criteria if not c.passed]
        if failed:
            print(
                f"\nNot promoted: {len(failed)} of {len(criteria)} criteria failed ({', '.join(c.name for c in failed)}). "
                f"Nothing was changed. The criteria are explained in {DOCS_PROMOTION}"
            )
            return 1
    elif page is None:
        print("  no docs page found (looked for " + ", ".join(str(p) for p in looked) + "); only the package changes")
    changes = promotion.plan(pkg, action, page, criteria, args.note if action == "promote" else args.reason)
    if not args.dry_run:
        promotion.apply(changes)
        new_version = promotion.read_package(pkg.root).version
        verb = {"promote": "Promoted to stable", "demote": "Demoted (deprecated)", "retire": "Retired"}[action]
        print(f"\n{verb}: {pkg.distribution} {new_version}.")
    _show_changes(pkg, changes, args.dry_run)
    if not args.dry_run:
        _reinstall_hint(pkg)
    return 0
