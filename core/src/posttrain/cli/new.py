"""``posttrain new NAME [--template lm|preference|online]``: scaffold a method package that installs and passes its own tests."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from posttrain._lifecycle import scaffold

    templates = scaffold.template_names()
    p = argparse.ArgumentParser(
        prog="posttrain new",
        description="Create a method package (posttrain-NAME) with a small working method, tests that run the "
        "conformance kit, a README, a CHANGELOG, a LICENSE, a docs page and configs/tiny.yaml. Works offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="templates:\n"
        + "\n".join(f"  {t:<12} {scaffold.template_info(t)['summary'].replace('`', '')}" for t in templates),
    )
    p.add_argument("name", help="public method name, [a-z][a-z0-9_-]* (e.g. my-method)")
    p.add_argument(
        "--template",
        "-t",
        choices=templates,
        default=scaffold.DEFAULT_TEMPLATE,
        help=f"the method to start from (default: {scaffold.DEFAULT_TEMPLATE}; see below)",
    )
    p.add_argument(
        "--directory",
        "-d",
        metavar="DIR",
        help="the package directory to create (default: ./posttrain-NAME); must not exist, or be empty",
    )
    p.add_argument("--description", metavar="TEXT", help="one-line summary shown by `posttrain list`")
    p.add_argument(
        "--author", metavar="NAME", help="author for pyproject.toml and LICENSE (default: git config user.name)"
    )
    p.add_argument("--url", metavar="URL", help="the package's home page (default: its PyPI page)")
    return p


def run(command: str, argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from posttrain._lifecycle import scaffold

    target = scaffold.generate(
        args.name,
        args.directory,
        description=args.description,
        author=args.author,
        template=args.template,
        url=args.url,
    )
    n = scaffold.names(args.name)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    modules = sorted(p.name for p in (target / "src" / n.package).glob("*.py") if p.name != "__init__.py")
    shown = os.path.relpath(target) if not os.path.relpath(target).startswith("..") else str(target)
    print(f"Created {n.distribution} ({args.template} template) in {shown}/ ({len(files)} files):")
    for f in files:
        print(f"  {f}")
    print(
        f"\nNext steps:\n"
        f"  cd {shown}\n"
        f"  pip install -e '.[test]'    # the package and pytest; registers the '{n.name}' method (experimental)\n"
        f"  pytest                      # unit tests, a tiny training run and the conformance kit\n"
        f"  python -c \"from posttrain.testing import build_tiny_model; build_tiny_model('tiny-model')\"\n"
        f"  posttrain train {n.name} --config configs/tiny.yaml\n"
        f"\nThe method lives in {Path('src', n.package)}/ ({', '.join(modules)}). The README "
        f"and docs/{n.name}.md have sections only you can write (marked '{scaffold.PLACEHOLDER_MARK}'). "
        f"When the method is ready for users, `posttrain promote` checks the promotion criteria."
    )
    return 0
