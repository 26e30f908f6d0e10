"""The code, the tests and the docs cite the repository's own documents: no "SPEC" (a document the repository
does not have), and every ``docs/NAME.md#section`` or ``README.md#section`` a module or a document cites exists. The
documented choices of the settings are the code's."""

from __future__ import annotations

import re
from pathlib import Path

from agentspace.config import CHOICES
from agentspace.context_policy import COMPACT_PURPOSE

ROOT = Path(__file__).resolve().parent.parent
TEXT = {".py", ".md", ".yaml", ".toml", ".js", ".css", ".html", ".txt"}


def text_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*")) if p.suffix in TEXT and p.is_file()]


def anchors(document: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_nothing_cites_a_spec_the_repository_does_not_have() -> None:
    files = [*text_files("agentspace", "docs", "tests", "plugins", "scripts"), ROOT / "README.md"]
    files = [p for p in files if "node_modules" not in p.parts and p != Path(__file__).resolve()]
    assert any(p.name == "protocol.md" for p in files)
    citing = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bSPEC\b", line)
    ]
    assert not citing, "cite the repository's docs (docs/protocol.md#section, docs/accounting.md, ...): " + ", ".join(
        citing
    )


def test_every_cited_section_exists() -> None:
    cited = 0
    for p in text_files("agentspace", "docs"):
        for target, anchor in re.findall(r"\b((?:docs/)?[\w-]+\.md)#([\w-]+)", p.read_text(encoding="utf-8")):
            document = ROOT / target if target.startswith("docs/") or target == "README.md" else p.parent / target
            if not document.is_file():
                continue  # a name that is not one of our documents
            cited += 1
            assert anchor in anchors(document), (
                f"{p.relative_to(ROOT)} cites {target}#{anchor}, which has no such section"
            )
    assert cited >= 5


def test_documented_choices_are_the_codes() -> None:
    """Each setting with a fixed set of values: config.example.toml's comment above it names every value;
    the context-window policies and the compaction call's purpose are named in docs/sessions.md."""
    example = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    for (section, key), choices in CHOICES.items():
        block = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", example, re.MULTILINE | re.DOTALL)
        assert block is not None, section
        comment = re.search(rf"((?:^#.*\n)+)(?:^# )?{key} = ", block[1], re.MULTILINE)
        assert comment is not None, f"[{section}] {key}: no comment above it"
        missing = [c for c in choices if f'"{c}"' not in comment[1]]
        assert not missing, f"config.example.toml [{section}] {key} does not name {missing}"
    sessions = (ROOT / "docs" / "sessions.md").read_text(encoding="utf-8")
    assert all(f"- `{policy}`" in sessions for policy in CHOICES[("chat", "context_policy")])
    assert f'`purpose: "{COMPACT_PURPOSE}"`' in sessions
