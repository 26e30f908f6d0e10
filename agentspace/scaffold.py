"""``agentspace plugins new NAME --kind KIND``: a plugin package that installs, passes its own tests and
shows in ``agentspace plugins``, for each kind of plugin (docs/plugins.md, "Start a plugin").

The files are templates with ``__NAME__`` (the plugin's name, also its entry point and, for a provider,
its model prefix), ``__MODULE__`` (``agentspace_NAME``) and ``__CLASS__`` (``Name``) filled in.
"""

from __future__ import annotations

import re
from pathlib import Path

KINDS = ("provider", "sink", "section", "command", "route")
NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "agentspace-__NAME__"
version = "0.1.0"
description = "agentspace plugin: __DESCRIPTION__"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["agentspace"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.24"]

# How agentspace finds the plugin: the entry point names the module that holds the @hookimpl functions.
[project.entry-points.agentspace]
__NAME__ = "__MODULE__"

[tool.setuptools]
py-modules = ["__MODULE__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
# agentspace.testing's gateway_client is async: every async test runs on its own event loop.
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

README = """\
# agentspace-__NAME__

An agentspace plugin: __DESCRIPTION__.

## Try it

    pip install -e '.[test]'
    pytest                       # its tests, against the real gateway (agentspace.testing)
    agentspace plugins           # lists "__NAME__" with its hooks

## What to change

__CHANGE__

The hooks and the optional methods are described in agentspace's docs/plugins.md. Keep the tests
passing: they run the plugin in the real gateway (`gateway_client`) and check the entry point
(`installed_plugin`), so a plugin that passes them works under `agentspace serve`.
"""

# A provider the sink and section tests chat with: answers "ok", needs no key and no network.
TEST_PROVIDER = '''

class FixedProvider:
    """Serves test/... model ids with a fixed answer, so that a chat runs without a key or a network."""

    name = "test"

    def claims(self, model: str) -> bool:
        return model.startswith("test/")

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        yield TextDelta("ok")
        usage = TokenUsage(input_tokens=5, output_tokens=1)
        yield ProviderFinish("stop", usage, ChatMessage("assistant", [TextPart("ok")]))


class FixedPlugin:
    @hookimpl
    def register_providers(self, register: Callable[[Any], None], config: Config) -> None:
        register(FixedProvider())


async def chat(client: Any, chat_id: str = "c1") -> str:
    """One turn through POST /api/chat (the AI SDK's stream): the stream's text."""
    resp = await client.post(
        "/api/chat",
        json={
            "id": chat_id,
            "trigger": "submit-message",
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}],
        },
    )
    assert resp.status == 200
    return await resp.text()
'''

INSTALLED_TEST = '''

def test_installed_with_its_entry_point() -> None:
    """Needs the package installed (pip install -e .): what `agentspace plugins` lists for it."""
    plugin = installed_plugin("__NAME__")
    assert plugin.plugin is __MODULE__
    assert "__HOOK__" in plugin.info["hooks"]
'''

TEMPLATES: dict[str, dict[str, str]] = {
    "provider": {
        "description": "a provider for __NAME__/... model ids",
        "hook": "register_providers",
        "change": """\
- `__MODULE__.py`: `MODELS` lists your models with what they cost and can do (the keys of a
  `[pricing."MODEL"]` table: prices per million tokens, `long_context` tiers, `context_window`,
  `max_output_tokens`, `supports_tools`/`supports_vision`/`supports_reasoning`, `deprecation_date`);
  `__CLASS__Provider.stream` calls your model's API instead of echoing in capitals (`request.api_key`,
  `request.base_url`, `request.options` come from `[providers.__NAME__]` and the key vault). Raise
  `agentspace.ProviderError` for upstream errors; end with exactly one `ProviderFinish` and the usage the
  upstream reported.
- Add `async def missing_key(model, api_key, base_url) -> bool` when your API needs a key
  (`agentspace keys add __NAME__`).
- `tests/`: what your model answers.""",
        "module": '''\
"""agentspace plugin __NAME__: a provider for ``__NAME__/...`` model ids (it answers in capitals: replace
``stream`` with a call to your model's API)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from agentspace import (
    ChatMessage,
    Config,
    Provider,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    count_tokens,
    hookimpl,
)

PREFIX = "__NAME__/"
# What each model costs (USD per million tokens) and can do: the keys of a [pricing."MODEL"] table, which
# the user's config may still override.
MODELS: dict[str, dict[str, Any]] = {
    "__NAME__/small": {
        "input_per_mtok": 0.5,
        "output_per_mtok": 1.5,
        "context_window": 32_000,
        "max_output_tokens": 4_096,
        "supports_tools": False,
        "supports_vision": False,
        "supports_reasoning": False,
    },
}


class __CLASS__Provider:
    name = "__NAME__"

    def claims(self, model: str) -> bool:
        return model.startswith(PREFIX)

    def models(self) -> list[str]:
        """Listed by `agentspace models`, GET /api/models and /v1/models."""
        return list(MODELS)

    def model_info(self, model: str) -> dict[str, Any] | None:
        """Prices, limits and capabilities of ``model``; None for a model you know nothing about."""
        return MODELS.get(model)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        text = request.messages[-1].text.upper() if request.messages else ""
        yield TextDelta(text)
        sent = "\\n".join([request.system, *(m.text for m in request.messages)])
        usage = TokenUsage(input_tokens=count_tokens(sent), output_tokens=count_tokens(text))
        yield ProviderFinish("stop", usage, ChatMessage("assistant", [TextPart(text)]))


@hookimpl
def register_providers(register: Callable[[Provider], None], config: Config) -> None:
    register(__CLASS__Provider())
''',
        "test": """\
from __future__ import annotations

from pathlib import Path

import __MODULE__
from agentspace.testing import gateway_client, installed_plugin, make_config, registered


def test_registers_a_provider_for_its_prefix(tmp_path: Path) -> None:
    [provider] = registered("register_providers", make_config(tmp_path), __MODULE__)
    assert provider.claims("__NAME__/small") and not provider.claims("other/small")


async def test_answers_through_the_gateway_and_lists_its_models(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[models]\\ndefault = "__NAME__/small"\\n')
    async with gateway_client(config, __MODULE__) as client:
        resp = await client.post(
            "/api/chat",
            json={
                "id": "c1",
                "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}],
            },
        )
        assert resp.status == 200
        assert "HELLO" in await resp.text()
        models = {m["id"]: m for m in (await (await client.get("/api/models")).json())["models"]}
    small = models["__NAME__/small"]
    assert small["priceKnown"] and small["inputPerMTok"] == 0.5 and small["contextWindow"] == 32_000
""",
    },
    "sink": {
        "description": "a usage sink writing every usage record to __NAME__-usage.jsonl",
        "hook": "register_usage_sinks",
        "change": """\
- `__MODULE__.py`: `__CLASS__Sink.record` sends a record where you want it (a file, a database, a
  webhook). It runs off the chat's path, from the sink's own queue: raise any exception to have the
  record retried with backoff, `agentspace.DropRecord` for one that can never be taken. `start` opens
  what the sink needs when the server starts (an HTTP session, a file); `aclose` closes it at shutdown.
- `[plugins.__NAME__] path` sets the file (default: `__NAME__-usage.jsonl` in the data directory).""",
        "module": '''\
"""agentspace plugin __NAME__: a usage sink appending every usage record to a JSON Lines file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agentspace import Config, UsageRecord, UsageSink, hookimpl

SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"path": ((str,), "")}


class __CLASS__Sink:
    name = "__NAME__"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    async def start(self) -> None:
        """When the server starts: open what ``record`` writes to."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    async def record(self, record: UsageRecord) -> None:
        """One record (``record.to_dict()`` is its JSON shape); raising makes the gateway retry it."""
        if self._file is None:
            await self.start()
        # On a thread: a sink runs on the server's event loop, and a disk may take its time.
        await asyncio.to_thread(self._append, json.dumps(record.to_dict()) + "\\n")

    def _append(self, line: str) -> None:
        assert self._file is not None
        self._file.write(line)
        self._file.flush()

    async def aclose(self) -> None:
        """At shutdown, after the sink's queue drained."""
        if self._file is not None:
            self._file.close()
            self._file = None


@hookimpl
def register_usage_sinks(register: Callable[[UsageSink], None], config: Config) -> None:
    path = config.plugin_settings("__NAME__", SETTINGS)["path"]
    register(__CLASS__Sink(config.resolve_path(path) if path else config.data_dir / "__NAME__-usage.jsonl"))
''',
        "test": """\
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import __MODULE__
from agentspace import (
    ChatMessage,
    Config,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    hookimpl,
)
from agentspace.testing import gateway_client, installed_plugin, make_config, registered
__TEST_PROVIDER__

def test_registers_a_sink(tmp_path: Path) -> None:
    [sink] = registered("register_usage_sinks", make_config(tmp_path), __MODULE__)
    assert sink.name == "__NAME__"


async def test_every_provider_call_reaches_the_file(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[models]\\ndefault = "test/model"\\n')
    async with gateway_client(config, __MODULE__, FixedPlugin()) as client:
        assert "ok" in await chat(client)
    # The server drained the sink's queue before it stopped.
    lines = (config.data_dir / "__NAME__-usage.jsonl").read_text().splitlines()
    [record] = [json.loads(line) for line in lines]
    assert record["model"] == "test/model" and record["inputTokens"] == 5
""",
    },
    "section": {
        "description": "a context section added to the system prompt of every call",
        "hook": "register_context_sections",
        "change": """\
- `__MODULE__.py`: `build` returns the section's text for a call (`request.session_id`, `request.model`,
  `request.user_message`, `request.config`); it may be `async`. Keep it fast: it runs before every call.
- `[plugins.__NAME__] text` sets the text (default: a placeholder). `agentspace inspect SESSION` shows the
  section's bytes, tokens and cost.""",
        "module": '''\
"""agentspace plugin __NAME__: a context section, sent in the system prompt of every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentspace import Config, ContextRequest, ContextSection, ContextSectionBuilder, hookimpl

SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"text": ((str,), "Notes from the __NAME__ plugin.")}


@hookimpl
def register_context_sections(register: Callable[[ContextSectionBuilder], None], config: Config) -> None:
    text = config.plugin_settings("__NAME__", SETTINGS)["text"]

    def build(request: ContextRequest) -> str:
        return text

    register(ContextSection("__NAME__", build))
''',
        "test": """\
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import __MODULE__
from agentspace import (
    ChatMessage,
    Config,
    ContextRequest,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    hookimpl,
)
from agentspace.testing import gateway_client, installed_plugin, make_config, registered
__TEST_PROVIDER__

def test_builds_the_configured_text(tmp_path: Path) -> None:
    config = make_config(tmp_path, plugins={"__NAME__": {"text": "Be brief."}})
    [section] = registered("register_context_sections", config, __MODULE__)
    request = ContextRequest(session_id=None, model="test/model", config=config)
    assert section.name == "__NAME__" and section.build(request) == "Be brief."


async def test_the_section_is_in_the_context_of_a_session(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[models]\\ndefault = "test/model"\\n')
    async with gateway_client(config, __MODULE__, FixedPlugin()) as client:
        await chat(client, "c1")
        context = await (await client.get("/api/sessions/c1/context")).json()
    row = next(s for s in context["sections"] if s["name"] == "__NAME__")
    assert row["byteCount"] == len("Notes from the __NAME__ plugin.")
""",
    },
    "command": {
        "description": "an `agentspace __NAME__` command",
        "hook": "register_commands",
        "change": """\
- `__MODULE__.py`: the command's options and what it does. Read the configuration with
  `agentspace.command_config()` (it finds the config and the data directory as `agentspace serve` does:
  `--config`, `AGENTSPACE_CONFIG`, `AGENTSPACE_HOME`) and add `@agentspace.config_options` to take
  `--config` and `--data-dir` after the command's name; keep imports of heavy packages inside the
  function, so that other commands start fast.""",
        "module": '''\
"""agentspace plugin __NAME__: the ``agentspace __NAME__`` command."""

from __future__ import annotations

import click

from agentspace import hookimpl


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="__NAME__")
    @click.option("--who", default="world", help="Whom to greet.")
    def command(who: str) -> None:
        """Say hello (replace with what your command does)."""
        click.echo(f"hello, {who}, from __NAME__")
''',
        "test": """\
from __future__ import annotations

import click
from click.testing import CliRunner

import __MODULE__
from agentspace.cli import main
from agentspace.testing import installed_plugin, plugin_manager


def test_the_command_runs() -> None:
    group = click.Group()
    with plugin_manager(__MODULE__) as pm:
        pm.hook.register_commands(cli=group)
    result = CliRunner().invoke(group, ["__NAME__", "--who", "you"])
    assert result.exit_code == 0 and result.output == "hello, you, from __NAME__\\n"


def test_agentspace_runs_the_installed_command() -> None:
    result = CliRunner().invoke(main, ["__NAME__"])
    assert result.exit_code == 0, result.output
    assert "hello, world, from __NAME__" in result.output
""",
    },
    "route": {
        "description": "an HTTP route, GET /api/plugins/__NAME__/hello",
        "hook": "register_routes",
        "change": """\
- `__MODULE__.py`: your routes and handlers. Keep the paths under `/api/plugins/__NAME__/`, so that
  they never shadow the gateway's own. Every route needs the gateway token (the server checks it before
  your handler runs); reach the running gateway through `request.app`.""",
        "module": '''\
"""agentspace plugin __NAME__: the route ``GET /api/plugins/__NAME__/hello``."""

from __future__ import annotations

from aiohttp import web

from agentspace import Config, hookimpl


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.query.get("who", "world"), "from": "__NAME__"})


@hookimpl
def register_routes(app: web.Application, config: Config) -> None:
    app.router.add_get("/api/plugins/__NAME__/hello", hello)
''',
        "test": """\
from __future__ import annotations

from pathlib import Path

import __MODULE__
from agentspace.testing import gateway_client, installed_plugin, make_config


async def test_the_route_answers_with_the_token_only(tmp_path: Path) -> None:
    async with gateway_client(make_config(tmp_path), __MODULE__) as client:
        resp = await client.get("/api/plugins/__NAME__/hello", params={"who": "you"})
        assert resp.status == 200 and await resp.json() == {"hello": "you", "from": "__NAME__"}
        resp = await client.get("/api/plugins/__NAME__/hello", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
""",
    },
}


class ScaffoldError(Exception):
    pass


def module_name(name: str) -> str:
    return "agentspace_" + name.replace("-", "_")


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _fill(text: str, name: str, kind: str) -> str:
    spec = TEMPLATES[kind]
    for key, value in (
        ("__TEST_PROVIDER__", TEST_PROVIDER),
        ("__DESCRIPTION__", spec["description"]),
        ("__CHANGE__", spec["change"]),
        ("__HOOK__", spec["hook"]),
        ("__MODULE__", module_name(name)),
        ("__CLASS__", class_name(name)),
        ("__NAME__", name),
    ):
        text = text.replace(key, value)
    return text


def write_package(name: str, kind: str, parent: Path) -> Path:
    """Write the package ``agentspace-NAME`` of ``kind`` into ``parent``; its folder."""
    if not NAME.match(name):
        raise ScaffoldError(f"{name!r}: a plugin name is lowercase letters and digits, words joined by '-'")
    if name.startswith("agentspace-"):  # it would make agentspace-agentspace-NAME
        raise ScaffoldError(
            f"{name!r}: the package is named agentspace-<name> already; give the name alone "
            f"({name.removeprefix('agentspace-')!r})"
        )
    if kind not in TEMPLATES:
        raise ScaffoldError(f"{kind!r}: the kinds are {', '.join(KINDS)}")
    root = parent / f"agentspace-{name}"
    if root.exists():
        raise ScaffoldError(f"{root} exists; choose another name or folder")
    spec = TEMPLATES[kind]
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{module_name(name)}.py": spec["module"],
        f"tests/test_{module_name(name)}.py": spec["test"] + INSTALLED_TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(template, name, kind), encoding="utf-8")
    return root
