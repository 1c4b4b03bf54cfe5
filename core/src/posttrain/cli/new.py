"""``posttrain new NAME``: scaffold a method package that installs and passes its own tests."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain new",
        description="Create a method package (posttrain-NAME) with a small working method, tests that run the "
        "conformance kit, a README, a CHANGELOG, a docs page and configs/tiny.yaml. Works offline.",
    )
    p.add_argument("name", help="public method name, [a-z][a-z0-9_-]* (e.g. my-method)")
    p.add_argument(
        "--template",
        choices=["lm", "environment"],
        default="lm",
        help="lm: a method (default); environment: a multi-turn environment with a tool (posttrain.environments)",
    )
    p.add_argument(
        "--directory",
        "-d",
        metavar="DIR",
        help="the package directory to create (default: ./posttrain-NAME); must not exist, or be empty",
    )
    p.add_argument("--description", metavar="TEXT", help="one-line summary shown by `posttrain list`")
    p.add_argument("--author", metavar="NAME", help="author for pyproject.toml (default: git config user.name)")
    return p


def run(command: str, argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from posttrain._lifecycle import scaffold

    target = scaffold.generate(
        args.name, args.directory, description=args.description, author=args.author, template=args.template
    )
    n = scaffold.names(args.name)
    if args.template == "environment":
        return _next_steps_environment(target, n)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    shown = os.path.relpath(target) if not os.path.relpath(target).startswith("..") else str(target)
    print(f"Created {n.distribution} in {shown}/ ({len(files)} files):")
    for f in files:
        print(f"  {f}")
    print(
        f"\nNext steps:\n"
        f"  cd {shown}\n"
        f"  pip install -e .            # registers the '{n.name}' method (posttrain list shows it, experimental)\n"
        f"  pytest                      # unit tests, a tiny training run and the conformance kit\n"
        f"  python -c \"from posttrain.testing import build_tiny_model; build_tiny_model('tiny-model')\"\n"
        f"  posttrain train {n.name} --config configs/tiny.yaml\n"
        f"\nThe method lives in {Path('src', n.package)}/ (config.py, data.py, loss.py, method.py). "
        f"When it is ready for users, `posttrain promote` checks the promotion criteria."
    )
    return 0


def _next_steps_environment(target: Path, n) -> int:
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    shown = os.path.relpath(target) if not os.path.relpath(target).startswith("..") else str(target)
    print(f"Created {n.distribution} in {shown}/ ({len(files)} files):")
    for f in files:
        print(f"  {f}")
    print(
        f"\nNext steps:\n"
        f"  cd {shown}\n"
        f"  pip install -e .            # registers the '{n.name}' environment (posttrain list shows it, experimental)\n"
        f"  pytest                      # unit tests and the environment conformance kit\n"
        f"  posttrain train grpo --environment {n.name} --dataset data/tiny.jsonl --model MODEL --output_dir runs/{n.name}\n"
        f"\nThe environment lives in {Path('src', n.package, 'environment.py')}."
    )
    return 0
