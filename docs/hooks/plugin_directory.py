"""Write the plugin directory page (docs/plugins.md) from the plugin index.

The index, ``core/src/posttrain/cli/plugin_index.json``, is the one list of packages: official ones
(refreshed here from ``plugins/*/pyproject.toml``, so status and core range never drift from the
metadata ``posttrain list`` reads) and known third-party ones (written by hand). ``posttrain install``
reads the same file to map a name to its package.

    python docs/hooks/plugin_directory.py           # refresh the index's official entries, rewrite the page
    python docs/hooks/plugin_directory.py --check   # exit 1 when either file is stale (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
INDEX = ROOT / "core" / "src" / "posttrain" / "cli" / "plugin_index.json"
PAGE = ROOT / "docs" / "plugins.md"
DOCS = ROOT / "docs"
GROUPS = {
    "methods": "posttrain.methods",
    "rewards": "posttrain.rewards",
    "environments": "posttrain.environments",
    "commands": "posttrain.commands",
    "hooks": "posttrain.plugins",
}
KINDS = {"hooks": ("hook module", "hook modules")}
FIX = "python docs/hooks/plugin_directory.py"


def _status(classifiers: list[str]) -> str:
    # Same rule as posttrain._discovery.status: 5/6 stable, 7 inactive, anything else experimental.
    levels = [int(m.group(1)) for c in classifiers if (m := re.match(r"Development Status\s*::\s*(\d)", c))]
    if not levels:
        return "experimental"
    level = min(levels)
    return "inactive" if level == 7 else "stable" if level >= 5 else "experimental"


def _core_range(dependencies: list[str]) -> str:
    for req in dependencies:
        m = re.match(r"^posttrain\s*(\[[^\]]*\])?\s*([^;]*)", req)
        if m:
            return m.group(2).strip()
    return ""


def official_entry(pyproject: Path, previous: dict | None) -> dict:
    """An index entry computed from a plugin's pyproject.toml; ``published`` is kept from the index."""
    project = tomllib.loads(pyproject.read_text())["project"]
    eps = project.get("entry-points", {})
    urls = project.get("urls", {})
    entry = {
        "package": project["name"],
        "origin": "official",
        "summary": project.get("description", ""),
        "status": _status(project.get("classifiers", [])),
        "requires_core": _core_range(project.get("dependencies", [])),
    }
    entry.update({field: sorted(eps.get(group, {})) for field, group in GROUPS.items()})
    entry["docs"] = urls.get("Documentation", "")
    entry["source"] = pyproject.parent.relative_to(ROOT).as_posix()
    entry["published"] = bool((previous or {}).get("published", False))
    return entry


def refreshed_index(index: dict) -> dict:
    """The index with every official entry recomputed; third-party entries untouched, sorted by name."""
    previous = {p["package"]: p for p in index.get("packages", [])}
    official = [official_entry(p, previous.get(p.parent.name)) for p in sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    names = {p["package"] for p in official}
    others = [p for p in index.get("packages", []) if p.get("origin") != "official" and p["package"] not in names]
    packages = sorted(official, key=lambda p: p["package"]) + sorted(others, key=lambda p: p["package"])
    return {"version": 1, "packages": packages}


def _provides(entry: dict) -> str:
    parts = []
    for field in GROUPS:
        names = entry.get(field, [])
        if names:
            singular, plural = KINDS.get(field, (field[:-1], field))
            kind = singular if len(names) == 1 else plural
            parts.append(f"{kind} " + ", ".join(f"`{n}`" for n in names))
    return "; ".join(parts) or "hooks only"


def _links(entry: dict) -> str:
    """Official packages link their page in these docs; third-party ones their own URLs."""
    links = []
    if entry.get("origin") == "official":
        pages = [f"methods/{m}.md" for m in entry.get("methods", [])] or (
            ["rewards.md"] if entry.get("rewards") else [_docs_page(entry.get("docs", ""))]
        )
        links += [f"[docs]({page})" for page in pages if page and (DOCS / page).is_file()]
    elif entry.get("docs"):
        links.append(f"[docs]({entry['docs']})")
    source = entry.get("source", "")
    if source.startswith(("http://", "https://")):
        links.append(f"[source]({source})")
    return " · ".join(links)


def _docs_page(url: str) -> str:
    """``https://posttrain.readthedocs.io/trackers/`` -> ``trackers.md`` (a page of these docs, or nothing)."""
    prefix = "https://posttrain.readthedocs.io/"
    path = url[len(prefix) :].strip("/") if url.startswith(prefix) else ""
    return f"{path}.md" if path else ""


def _install(entry: dict) -> str:
    package = entry["package"]
    short = package[len("posttrain-") :] if entry.get("origin") == "official" else package
    return f"`posttrain install {short}`"


def _table(entries: list[dict]) -> list[str]:
    lines = [
        "| package | provides | status | core | install | links |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        core = f"`{e['requires_core']}`" if e.get("requires_core") else "any"
        lines.append(
            f"| **{e['package']}**<br>{e.get('summary', '')} | {_provides(e)} | {e.get('status', '?')} | {core} "
            f"| {_install(e)} | {_links(e)} |"
        )
    return lines


def render(index: dict) -> str:
    official = [p for p in index["packages"] if p.get("origin") == "official"]
    others = [p for p in index["packages"] if p.get("origin") != "official"]
    unpublished = [p["package"] for p in official if not p.get("published")]
    lines = [
        "<!-- Generated from core/src/posttrain/cli/plugin_index.json by docs/hooks/plugin_directory.py; "
        "do not edit by hand. -->",
        "",
        "# Plugin directory",
        "",
        "Every package here installs with `posttrain install NAME`, where NAME is the package, its short",
        "form (`dpo` for posttrain-dpo) or a method, reward or command it provides. The same list answers",
        "\"method 'dpo' is not installed; it is provided by posttrain-dpo: run `posttrain install dpo`\".",
        "**stable** packages follow semver; **experimental** ones may change in any release (see the",
        "[promotion policy](promotion.md)). The core range is the `posttrain` versions a package supports;",
        "`posttrain install` keeps the installed core and refuses a package whose range excludes it.",
        "",
        "## Official packages",
        "",
        "These live in this repository under `plugins/`, are tested together with the core and released",
        "with it.",
        "",
        *_table(official),
        "",
    ]
    if unpublished:
        lines += [
            '!!! note "Not on PyPI yet"',
            "    The official packages are not published on PyPI yet. `posttrain install dpo` installs them",
            "    from the `plugins/` folder of the source checkout your core was installed from (see",
            "    [posttrain install](cli.md#posttrain-install)); without a checkout it says so and how to get one.",
            "",
        ]
    lines += ["## Third-party packages", ""]
    if others:
        lines += [
            "Published and maintained by their authors, not reviewed by posttrain: read a package's",
            "page before you train with it.",
            "",
            *_table(others),
            "",
        ]
    else:
        lines += ["None are listed yet.", ""]
    lines += [
        "## Adding a package",
        "",
        "A package you publish works without being listed: `posttrain install your-package` installs any",
        "distribution by name, path or URL, and `posttrain list` shows what it provides. Listing it here",
        "makes its names installable by short name and lets the error for a missing method point to it.",
        "Add an entry to `core/src/posttrain/cli/plugin_index.json`:",
        "",
        "```json",
        "{",
        '  "package": "acme-posttrain-simpo",',
        '  "origin": "third-party",',
        '  "summary": "SimPO: reference-free preference optimisation.",',
        '  "status": "experimental",',
        '  "requires_core": ">=0.1,<1",',
        '  "methods": ["simpo"], "rewards": [], "environments": [], "commands": [],',
        '  "docs": "https://acme.example/simpo", "source": "https://git.example/acme/simpo",',
        '  "published": true',
        "}",
        "```",
        "",
        f"then run `{FIX}` to rewrite this page (a test fails while it is stale).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refresh the plugin index and write docs/plugins.md.")
    parser.add_argument("--check", action="store_true", help="report stale files and exit 1 instead of writing")
    args = parser.parse_args(argv)
    current = INDEX.read_text()
    index = refreshed_index(json.loads(current))
    index_text = json.dumps(index, indent=2) + "\n"
    page_text = render(index)
    stale = [
        path
        for path, text in ((INDEX, index_text), (PAGE, page_text))
        if not path.is_file() or path.read_text() != text
    ]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale; regenerate it with `{FIX}`", file=sys.stderr)
        return 1 if stale else 0
    INDEX.write_text(index_text)
    PAGE.write_text(page_text)
    for path in stale:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
