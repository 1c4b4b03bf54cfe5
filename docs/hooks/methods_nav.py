"""mkdocs hook: build the Methods section (Stable / Experimental) from each plugin's classifier.

The status shown in the docs is read from the same metadata `posttrain list` reads (the
`Development Status` classifier in plugins/*/pyproject.toml), so the two never drift: promoting a
package moves its page to the Stable section on the next build.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _status(classifiers: list[str]) -> str:
    levels = [int(m.group(1)) for c in classifiers if (m := re.match(r"Development Status\s*::\s*(\d)", c))]
    if not levels:
        return "experimental"
    level = min(levels)
    return "inactive" if level == 7 else "stable" if level >= 5 else "experimental"


def method_pages(docs_dir: Path) -> dict[str, list[dict[str, str]]]:
    sections: dict[str, list[dict[str, str]]] = {"stable": [], "experimental": [], "inactive": []}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        eps = project.get("entry-points", {}).get("posttrain.methods", {})
        status = _status(project.get("classifiers", []))
        for name in sorted(eps):
            page = f"methods/{name}.md"
            if (docs_dir / page).is_file():
                sections[status].append({f"{name} ({project['name']} {project['version']})": page})
    return sections


def on_config(config, **kwargs):
    docs_dir = Path(config["docs_dir"])
    sections = method_pages(docs_dir)
    methods = [{"Overview": "methods/index.md"}, {"Stable": sections["stable"]}]
    if sections["experimental"]:
        methods.append({"Experimental": sections["experimental"]})
    if sections["inactive"]:
        methods.append({"Retired": sections["inactive"]})
    for i, item in enumerate(config["nav"]):
        if isinstance(item, dict) and "Methods" in item:
            config["nav"][i] = {"Methods": methods}
    return config
