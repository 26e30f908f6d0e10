from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import agentspace_skills
import pytest
from agentspace_skills import FrontMatterError, parse_front_matter

from agentspace import Config, ConfigError, ContextRequest
from agentspace.plugins import create_plugin_manager
from agentspace.testing import installed_plugin, make_config, registered


def skills_section(config: Config) -> Any:
    """The section the plugin registers, obtained through the hook like the gateway does."""
    [section] = registered("register_context_sections", config, agentspace_skills)
    assert section.name == "skills"
    return section


def skills_config(tmp_path: Path, **settings: Any) -> Config:
    return make_config(tmp_path, plugins={"skills": settings})


async def build(config: Config) -> str:
    return await skills_section(config).build(ContextRequest(session_id=None, model="echo/echo", config=config))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


async def test_lists_each_skill_with_description_and_path(tmp_path: Path) -> None:
    folder = tmp_path / "skills"
    pdf = write(
        folder / "pdf" / "SKILL.md", "---\nname: pdf\ndescription: Extract text from PDF files.\n---\nSteps...\n"
    )
    csv = write(folder / "csv.md", "---\nname: \"csv\"\ndescription: 'Clean CSV files'\n---\n")
    write(folder / "notes.txt", "---\nname: not-a-skill\n---\n")
    text = await build(skills_config(tmp_path, folder="skills"))
    assert text == (
        "Available skills:\n"
        f"- csv: Clean CSV files ({csv.resolve()})\n"
        f"- pdf: Extract text from PDF files. ({pdf.resolve()})"
    )


async def test_default_folder_is_skills_in_the_data_dir(tmp_path: Path) -> None:
    write(tmp_path / "data" / "skills" / "a" / "SKILL.md", "---\nname: a\n---\n")
    assert (await build(skills_config(tmp_path))).startswith("Available skills:\n- a (")


async def test_missing_or_empty_folder_gives_empty_section(tmp_path: Path) -> None:
    assert await build(skills_config(tmp_path, folder="none")) == ""
    (tmp_path / "empty").mkdir()
    assert await build(skills_config(tmp_path, folder="empty")) == ""


async def test_bad_files_are_skipped_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "s"
    write(folder / "good" / "SKILL.md", "---\nname: good\ndescription: works\n---\n")
    write(folder / "nameless" / "SKILL.md", "---\ndescription: no name\n---\n")
    write(folder / "plain.md", "# Just markdown\n")
    write(folder / "unclosed.md", "---\nname: x\n")
    write(folder / "garbled.md", "---\nname: y\nthis line has no colon\n---\n")
    write(folder / "other.md", "---\nname: good\n---\n")
    section = skills_section(skills_config(tmp_path, folder="s"))
    request = ContextRequest(session_id=None, model="echo/echo", config=None)
    with caplog.at_level(logging.WARNING, logger="agentspace_skills"):
        first = await section.build(request)
        await section.build(request)
    assert first == f"Available skills:\n- good: works ({(folder / 'good' / 'SKILL.md').resolve()})"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5
    for fragment in ("no 'name'", "no front matter", "not closed", "line 3: expected 'key: value'", "already used"):
        assert sum(fragment in m for m in messages) == 1, fragment


async def test_new_skills_show_up_on_the_next_build(tmp_path: Path) -> None:
    section = skills_section(skills_config(tmp_path, folder="s"))
    request = ContextRequest(session_id=None, model="echo/echo", config=None)
    assert await section.build(request) == ""
    write(tmp_path / "s" / "new" / "SKILL.md", "---\nname: new\n---\n")
    assert (await section.build(request)).startswith("Available skills:\n- new (")


def test_front_matter_comments_continuations_and_block_indicators() -> None:
    text = "---\n# a comment\nname: web\ndescription: >\n  Search the web\n  and summarize.\nlicense: MIT\n---\nbody: not parsed\n"
    assert parse_front_matter(text) == {"name": "web", "description": "Search the web and summarize.", "license": "MIT"}
    assert parse_front_matter("---\nname: a: b\n---") == {"name": "a: b"}
    with pytest.raises(FrontMatterError):
        parse_front_matter("")


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        skills_section(skills_config(tmp_path, folder=["x"]))
    assert e.value.key == "plugins.skills.folder"
    with pytest.raises(ConfigError) as e:
        skills_section(skills_config(tmp_path, path="x"))
    assert e.value.key == "plugins.skills.path"


def test_discovered_through_the_entry_point() -> None:
    installed = installed_plugin("skills")
    assert installed.plugin is agentspace_skills
    assert installed.info["package"] == "agentspace-skills"
    assert installed.info["hooks"] == ["register_context_sections"]


def test_agentspace_load_plugins_selects_it_by_entry_point_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "skills")
    assert create_plugin_manager().get_plugin("skills") is agentspace_skills
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "memory")
    assert create_plugin_manager().get_plugin("skills") is None
