"""agentspace plugin: the ``skills`` context section, listing the skills found in a folder.

A skill is a markdown file with front matter naming it::

    ---
    name: pdf
    description: Extract text and tables from PDF files.
    ---
    (instructions the model reads when it uses the skill)

Skills are found as ``FOLDER/*/SKILL.md`` and ``FOLDER/*.md``. Only the name, description and path go into
the context, so a large library of skills costs a few tokens each; the model opens a file when it needs it.
The front matter is parsed here (simple ``key: value`` lines) so the plugin needs no YAML library.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentspace import Config, ContextRequest, ContextSectionBuilder, hookimpl

log = logging.getLogger(__name__)

SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"folder": ((str,), None)}
# Front matter sits at the top of the file; reading this much is enough and bounds the work per file.
FRONT_MATTER_MAX_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class Skill:
    name: str
    description: str
    path: Path


class FrontMatterError(ValueError):
    pass


def parse_front_matter(text: str) -> dict[str, str]:
    """``key: value`` lines between a leading ``---`` line and the next ``---`` line.

    Supports what SKILL.md files use: quoted values, ``#`` comments, and indented continuation lines
    (also after a ``>`` or ``|`` block indicator), folded into one line.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise FrontMatterError("no front matter (the file must start with a '---' line)")
    fields: dict[str, str] = {}
    key: str | None = None
    for number, line in enumerate(lines[1:], start=2):
        stripped = line.strip()
        if stripped == "---":
            return {k: _unquote(v) for k, v in fields.items()}
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t" and key is not None:
            fields[key] = f"{fields[key]} {stripped}".strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise FrontMatterError(f"line {number}: expected 'key: value', got {stripped!r}")
        key = name.strip()
        value = value.strip()
        fields[key] = "" if value in (">", "|", ">-", "|-") else value
    raise FrontMatterError("front matter is not closed by a '---' line")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


class SkillsSection:
    """Scans the folder on every build, so added or edited skills show up on the next message."""

    name = "skills"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Problems already logged: build runs on every call, and one warning per problem is enough.
        self._reported: set[tuple[Path, str]] = set()

    async def build(self, request: ContextRequest) -> str:
        return await asyncio.to_thread(self.render)

    def render(self) -> str:
        skills = self.find_skills()
        if not skills:
            return ""
        lines = ["Available skills:"]
        for skill in skills:
            about = f": {skill.description}" if skill.description else ""
            lines.append(f"- {skill.name}{about} ({skill.path})")
        return "\n".join(lines)

    def find_skills(self) -> list[Skill]:
        if not self.folder.is_dir():
            return []
        paths = sorted({*self.folder.glob("*/SKILL.md"), *self.folder.glob("*.md")})
        found: dict[str, Skill] = {}
        for path in paths:
            if not path.is_file():
                continue
            skill = self._read(path)
            if skill is None:
                continue
            if skill.name in found:
                self._report(path, f"skill name {skill.name!r} is already used by {found[skill.name].path}; skipped")
                continue
            found[skill.name] = skill
        return sorted(found.values(), key=lambda s: s.name)

    def _read(self, path: Path) -> Skill | None:
        try:
            with path.open("rb") as f:
                head = f.read(FRONT_MATTER_MAX_BYTES).decode("utf-8", errors="replace")
            fields = parse_front_matter(head)
        except OSError as e:
            self._report(path, f"cannot be read: {e.strerror or e}")
            return None
        except FrontMatterError as e:
            self._report(path, str(e))
            return None
        name = fields.get("name", "").strip()
        if not name:
            self._report(path, "front matter has no 'name'; skipped")
            return None
        return Skill(name, " ".join(fields.get("description", "").split()), path.resolve())

    def _report(self, path: Path, problem: str) -> None:
        if (path, problem) not in self._reported:
            self._reported.add((path, problem))
            log.warning("skills: %s: %s", path, problem)


def skills_folder(config: Config) -> Path:
    folder = config.plugin_settings("skills", SETTINGS)["folder"]
    return config.data_dir / "skills" if folder is None else config.resolve_path(folder)


@hookimpl
def register_context_sections(register: Callable[[ContextSectionBuilder], None], config: Config) -> None:
    register(SkillsSection(skills_folder(config)))
