from __future__ import annotations

from pathlib import Path
from typing import Any

import agentspace_memory
import pytest

from agentspace import Config, ConfigError, ContextRequest
from agentspace.plugins import create_plugin_manager
from agentspace.testing import installed_plugin, make_config, registered


def memory_section(config: Config) -> Any:
    """The section the plugin registers, obtained through the hook like the gateway does."""
    [section] = registered("register_context_sections", config, agentspace_memory)
    assert section.name == "memory"
    return section


def memory_config(tmp_path: Path, **settings: Any) -> Config:
    return make_config(tmp_path, plugins={"memory": settings})


async def build(config: Config) -> str:
    return await memory_section(config).build(ContextRequest(session_id=None, model="echo/echo", config=config))


async def test_files_sorted_by_name_each_under_its_heading(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "b-projects.md").write_text("Working on agentspace.\n")
    (folder / "a-profile.md").write_text("Name: Ada\n")
    (folder / "ignored.txt").write_text("not markdown")
    (folder / "blank.md").write_text("  \n")
    text = await build(memory_config(tmp_path, folder="notes"))
    assert text == "## a-profile.md\n\nName: Ada\n\n## b-projects.md\n\nWorking on agentspace."


async def test_default_folder_is_memory_in_the_data_dir(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "memory"
    folder.mkdir(parents=True)
    (folder / "me.md").write_text("hello")
    assert await build(memory_config(tmp_path)) == "## me.md\n\nhello"


async def test_missing_or_empty_folder_gives_empty_section(tmp_path: Path) -> None:
    assert await build(memory_config(tmp_path, folder="nowhere")) == ""
    (tmp_path / "empty").mkdir()
    assert await build(memory_config(tmp_path, folder="empty")) == ""


async def test_edits_show_up_on_the_next_build(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    config = memory_config(tmp_path, folder=str(folder))
    section = memory_section(config)
    request = ContextRequest(session_id="s1", model="echo/echo", config=config)
    assert await section.build(request) == ""
    (folder / "x.md").write_text("new fact")
    assert await section.build(request) == "## x.md\n\nnew fact"


async def test_total_is_capped_and_the_cut_is_stated(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.md").write_text("a" * 40)
    (folder / "b.md").write_text("é" * 100)  # two bytes each: the cut must not split a character
    (folder / "c.md").write_text("c" * 10)
    text = await build(memory_config(tmp_path, folder="m", max_bytes=80))
    shown, note = text.split("\n\n[Memory truncated", 1)
    assert len(shown.encode()) <= 80
    assert shown.startswith("## a.md\n\n" + "a" * 40 + "\n\n## b.md\n\né")
    assert "\ufffd" not in shown
    assert note == " at 80 bytes (plugins.memory.max_bytes); not shown in full: b.md, c.md]"


async def test_content_within_the_cap_is_not_marked_truncated(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.md").write_text("x" * 10)
    text = await build(memory_config(tmp_path, folder="m", max_bytes=len("## a.md\n\n") + 10))
    assert text == "## a.md\n\n" + "x" * 10


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"max_bytes": 0}, "plugins.memory.max_bytes"),
        ({"folder": 3}, "plugins.memory.folder"),
        ({"fodler": "x"}, "plugins.memory.fodler"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        memory_section(memory_config(tmp_path, **settings))
    assert e.value.key == key
    assert "agentspace.toml" in str(e.value)


def test_discovered_through_the_entry_point() -> None:
    installed = installed_plugin("memory")
    assert installed.plugin is agentspace_memory
    assert installed.info["package"] == "agentspace-memory"
    assert installed.info["hooks"] == ["register_context_sections"]


def test_agentspace_load_plugins_selects_it_by_distribution_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "agentspace-memory")
    assert create_plugin_manager().get_plugin("memory") is agentspace_memory
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "")
    assert create_plugin_manager().get_plugin("memory") is None
