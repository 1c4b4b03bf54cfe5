"""``posttrain new``: generate a method package from the template shipped inside core.

The method template lives in ``template/``; ``templates/environment/`` holds the environment package's
(``posttrain new NAME --template environment``). Every file ends in ``.tmpl`` (so neither Python, pytest nor
pip byte-compilation treats it as code) and holds ``{{key}}`` placeholders, in file contents and in
path names alike. Rendering is a plain substitution; an unknown key is an error, so the template
and :func:`placeholders` cannot drift apart unnoticed. Standard library only: works offline.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from posttrain import PosttrainError

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SUFFIX = ".tmpl"
_RENAMES = {"gitignore": ".gitignore"}  # dotfiles are stored without the dot
#: ``--template`` -> the folder holding its files; the environment's ``template.json`` gives its default summary.
TEMPLATES = {"lm": ("template",), "environment": ("templates", "environment")}


@dataclass(frozen=True)
class Names:
    """Every spelling of a method name the package uses."""

    name: str  # public method name and entry-point name: "my-method"
    distribution: str  # "posttrain-my-method"
    package: str  # import package: "posttrain_my_method"
    class_name: str  # method class: "MyMethod" (config class: "MyMethodConfig")


def names(name: str) -> Names:
    """Validate ``name`` and derive the distribution, package and class names from it.

    Raises:
        PosttrainError: when ``name`` does not match ``[a-z][a-z0-9_-]*``.
    """
    if not NAME_RE.match(name or ""):
        raise PosttrainError(
            f"invalid method name {name!r}: names must match [a-z][a-z0-9_-]* (lower case, starting with a "
            "letter; digits, '-' and '_' after it), e.g. 'my-method'. The name is what users type in "
            "`posttrain train NAME`."
        )
    if name.startswith("posttrain-"):
        raise PosttrainError(
            f"give the method name, not the distribution name: `posttrain new {name[len('posttrain-') :]}` "
            f"creates the package {name}."
        )
    words = [w for w in re.split(r"[-_]+", name) if w]
    class_name = "".join(w[:1].upper() + w[1:] for w in words)
    return Names(name, f"posttrain-{name}", "posttrain_" + name.replace("-", "_"), class_name)


def core_range(core_version: str) -> tuple[str, str]:
    """("X.Y", "X+1") for the ``posttrain>=X.Y,<X+1`` requirement of a package built on core X.Y."""
    parts = [int(m) for m in re.findall(r"\d+", core_version)[:2]] + [0, 0]
    return f"{parts[0]}.{parts[1]}", str(parts[0] + 1)


def _toml_string(text: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for everything json.dumps emits
    return json.dumps(text, ensure_ascii=False)


def _git_author() -> str:
    try:
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def placeholders(n: Names, description: str, author: str, core_version: str, date: str) -> dict[str, str]:
    """The values substituted for ``{{key}}`` in the template."""
    core_min, core_next_major = core_range(core_version)
    authors = f"authors = [{{ name = {_toml_string(author)} }}]\n" if author else ""
    return {
        "name": n.name,
        "snake": n.name.replace("-", "_"),
        "distribution": n.distribution,
        "package": n.package,
        "class_name": n.class_name,
        "description": description,
        "description_toml": _toml_string(description),
        "description_py": description.replace("\\", "\\\\").replace('"', '\\"'),
        "authors_toml": authors,
        "core_min": core_min,
        "core_next_major": core_next_major,
        "date": date,
    }


def render(text: str, values: dict[str, str], where: str = "the template") -> str:
    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"unknown placeholder {{{{{key}}}}} in {where}")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def template_files(template: str = "lm") -> list[tuple[str, str]]:
    """(relative path with placeholders, text) of every file of ``template``, sorted by path."""
    root = resources.files("posttrain._lifecycle.scaffold").joinpath(*TEMPLATES[template])
    found: list[tuple[str, str]] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, rel + "/")
            elif child.name.endswith(_SUFFIX):
                found.append((rel, child.read_text(encoding="utf-8")))

    walk(root, "")
    return sorted(found)


def render_files(values: dict[str, str], template: str = "lm") -> dict[str, str]:
    """Relative output path -> rendered text, for every file of ``template``."""
    out = {}
    for rel, text in template_files(template):
        path = render(rel[: -len(_SUFFIX)], values, rel)
        head, _, base = path.rpartition("/")
        base = _RENAMES.get(base, base)
        out[f"{head}/{base}" if head else base] = render(text, values, rel)
    return out


def generate(
    name: str,
    directory: str | Path | None = None,
    description: str | None = None,
    author: str | None = None,
    core_version: str | None = None,
    date: str | None = None,
    template: str = "lm",
) -> Path:
    """Write a new method package and return its directory.

    Args:
        name: the public method name, ``[a-z][a-z0-9_-]*``.
        directory: the package directory to create; default ``./posttrain-<name>``. It must not
            exist, or be empty.
        description: the one-line summary ``posttrain list`` shows.
        author: written to ``authors`` in pyproject.toml; default ``git config user.name`` if set.
        core_version: the posttrain version to require (``>=X.Y,<X+1``); default the installed one.
        date: the date of the first CHANGELOG entry (ISO format); default today.
        template: ``lm`` (a method: next-token cross-entropy) or ``environment`` (a multi-turn environment
            with a tool, tested by the environment conformance kit).

    Raises:
        PosttrainError: invalid name or template, or the directory exists and is not empty.
    """
    if template not in TEMPLATES:
        raise PosttrainError(
            f"unknown template {template!r}: the templates are {', '.join(TEMPLATES)}. Pass one with --template."
        )
    n = names(name)
    target = Path(directory) if directory is not None else Path.cwd() / n.distribution
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PosttrainError(
            f"{target} already exists and is not empty; `posttrain new` never overwrites files. "
            "Choose another --directory, or remove that one first."
        )
    if description is not None and ("\n" in description or not description.strip()):
        raise PosttrainError("--description must be one non-empty line (it becomes the package Summary).")
    if core_version is None:
        from posttrain._discovery import core_version as installed_core

        core_version = installed_core()
    default = f"{n.name}: next-token cross-entropy on text rows."
    if template == "environment":
        info = resources.files("posttrain._lifecycle.scaffold").joinpath(*TEMPLATES[template], "template.json")
        default = json.loads(info.read_text(encoding="utf-8"))["description"].format(name=n.name)
    values = placeholders(
        n,
        description.strip() if description else default,
        (author if author is not None else _git_author()).strip(),
        core_version,
        date or datetime.date.today().isoformat(),
    )
    files = render_files(values, template)  # render everything before writing anything
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
