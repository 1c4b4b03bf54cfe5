"""``posttrain new``: generate a method package from a template shipped inside core.

Templates live in ``templates/``: ``common/`` holds the files every package has (pyproject.toml,
LICENSE, CHANGELOG, MANIFEST.in, the test fixtures) and each other folder is one template, chosen with
``posttrain new NAME --template FOLDER``: its ``template.json`` (a one-line summary and the default
package description) and its files, which are laid over ``common/`` (a file at the same path wins).
Adding a template (``environment``) is adding one folder.

Every file ends in ``.tmpl`` (so neither Python, pytest nor pip byte-compilation treats it as code)
and holds ``{{key}}`` placeholders, in file contents and in path names alike. Rendering is a plain
substitution; an unknown key is an error, so the templates and :func:`placeholders` cannot drift apart
unnoticed. Sections of the README and the docs page that only the author can write are blockquotes
starting with :data:`PLACEHOLDER_MARK`; ``posttrain promote`` refuses a package that still has one.
Standard library only: works offline.
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
COMMON = "common"
DEFAULT_TEMPLATE = "lm"
PLACEHOLDER_MARK = "Write before promotion:"
"""Starts every section of a generated README or docs page that the author has to write."""


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


def template_names() -> list[str]:
    """The templates ``posttrain new --template`` offers: every folder of ``templates/`` with a template.json."""
    root = resources.files("posttrain._lifecycle.scaffold") / "templates"
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "template.json").is_file())


def template_info(template: str) -> dict[str, str]:
    """A template's ``template.json``: ``summary`` (one line, for ``--help`` and the CHANGELOG) and
    ``description`` (the package Summary when ``--description`` is not given; may use ``{name}``).

    Raises:
        PosttrainError: an unknown template, naming the ones there are.
    """
    if template not in template_names():
        raise PosttrainError(
            f"unknown template {template!r}: the templates are {', '.join(template_names())}. "
            "Pass one of them with --template."
        )
    root = resources.files("posttrain._lifecycle.scaffold") / "templates" / template
    return json.loads((root / "template.json").read_text(encoding="utf-8"))


def placeholder_phrases() -> list[str]:
    """The instruction of every section the templates leave for the author, as it reads without its mark.

    ``posttrain promote`` refuses docs that still hold one, with or without the mark in front of it.
    """
    quoted = re.compile(r"^> \*\*\{\{placeholder_mark\}\}\*\* (.+?)(?:\n(?!>)|\Z)", re.M | re.S)
    phrases = set()
    for template in template_names():
        for rel, text in template_files(template):
            for block in quoted.findall(text) if rel.endswith(".md.tmpl") else ():
                instruction = " ".join(line.lstrip("> ").strip() for line in block.splitlines())
                phrases.add(instruction.split(". ")[0][:80])  # the first sentence is the template's own wording
    return sorted(phrases)


def placeholders(
    n: Names,
    description: str,
    author: str,
    core_version: str,
    date: str,
    template: str = DEFAULT_TEMPLATE,
    url: str | None = None,
) -> dict[str, str]:
    """The values substituted for ``{{key}}`` in the templates."""
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
        "copyright_holder": author or f"the {n.distribution} authors",
        "year": date[:4],
        "core_min": core_min,
        "core_next_major": core_next_major,
        "date": date,
        "template": template,
        "template_summary": template_info(template)["summary"],
        "url": url or f"https://pypi.org/project/{n.distribution}/",
        "placeholder_mark": PLACEHOLDER_MARK,
    }


def render(text: str, values: dict[str, str], where: str = "the template") -> str:
    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"unknown placeholder {{{{{key}}}}} in {where}")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def template_files(template: str = DEFAULT_TEMPLATE) -> list[tuple[str, str]]:
    """(relative path with placeholders, text) of every file of ``template`` laid over ``common/``."""
    template_info(template)  # an unknown template is an error naming the known ones
    root = resources.files("posttrain._lifecycle.scaffold") / "templates"
    found: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, rel + "/")
            elif child.name.endswith(_SUFFIX):
                found[rel] = child.read_text(encoding="utf-8")

    walk(root / COMMON, "")
    walk(root / template, "")  # the template's own files win over common ones at the same path
    return sorted(found.items())


def render_files(values: dict[str, str], template: str = DEFAULT_TEMPLATE) -> dict[str, str]:
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
    template: str = DEFAULT_TEMPLATE,
    url: str | None = None,
) -> Path:
    """Write a new method package and return its directory.

    Args:
        name: the public method name, ``[a-z][a-z0-9_-]*``.
        directory: the package directory to create; default ``./posttrain-<name>``. It must not
            exist, or be empty.
        description: the one-line summary ``posttrain list`` shows; default the template's.
        author: written to ``authors`` in pyproject.toml and to LICENSE; default ``git config user.name``.
        core_version: the posttrain version to require (``>=X.Y,<X+1``); default the installed one.
        date: the date of the first CHANGELOG entry (ISO format); default today.
        template: which starting method (:func:`template_names`): ``lm`` (next-token cross-entropy on
            text), ``preference`` (a pairwise loss against a frozen reference model) or ``online``
            (REINFORCE on sampled completions scored by reward functions).
        url: the package's home page for ``[project.urls]``; default its PyPI page.

    Raises:
        PosttrainError: invalid name or template, or the directory exists and is not empty.
    """
    n = names(name)
    info = template_info(template)
    target = Path(directory) if directory is not None else Path.cwd() / n.distribution
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PosttrainError(
            f"{target} already exists and is not empty; `posttrain new` never overwrites files. "
            "Choose another --directory, or remove that one first."
        )
    if description is not None and ("\n" in description or not description.strip()):
        raise PosttrainError("--description must be one non-empty line (it becomes the package Summary).")
    if url is not None and not re.match(r"^https?://\S+$", url):
        raise PosttrainError(f"--url must be an http(s) address without spaces, got {url!r}.")
    if core_version is None:
        from posttrain._discovery import core_version as installed_core

        core_version = installed_core()
    values = placeholders(
        n,
        description.strip() if description else info["description"].format(name=n.name),
        (author if author is not None else _git_author()).strip(),
        core_version,
        date or datetime.date.today().isoformat(),
        template,
        url,
    )
    files = render_files(values, template)  # render everything before writing anything
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
