"""``posttrain env``: versions, plugins and hardware, pasteable into a bug report."""

from __future__ import annotations

import argparse
import json


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="posttrain env", description="Print environment details for bug reports.")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from posttrain._environment import summary

    env = summary(with_hardware=True)
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    lines = [
        f"- Platform: {env['platform']}",
        f"- Python version: {env['python']}",
        f"- posttrain version: {env['posttrain']}",
    ]
    lines += [f"- {name} version: {version}" for name, version in env["libraries"].items()]
    acc = env["accelerator"]
    lines.append(f"- CUDA available: {acc.get('cuda_available')}")
    if acc.get("gpus"):
        lines.append(
            f"- GPUs: {', '.join(acc['gpus'])} (CUDA {acc.get('cuda_version')}, bf16 {acc.get('bf16_supported')})"
        )
    lines.append(f"- Processes (WORLD_SIZE): {env['processes']}")
    lines.append("- Plugins:" if env["plugins"] else "- Plugins: none installed")
    lines += [
        f"    {pl['kind']} {pl['name']}: {pl['package']} {pl['version']} ({pl['status']})" for pl in env["plugins"]
    ]
    print("\n".join(lines))
    return 0
