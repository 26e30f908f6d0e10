"""What a third-party plugin gets wrong must not take the gateway down, and must be named when it stops the
start (docs/plugins.md): a usage sink hanging in ``start`` or ``aclose``, a hook registering an object of the
wrong kind, a ``server_startup`` that raises, two providers claiming the same model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from agentspace import ContextSection, UsageRecord, hookimpl
from agentspace.config import Config, ConfigError
from agentspace.limits import usd
from agentspace.plugins import create_plugin_manager
from agentspace.storage import SessionStore, UsageStore
from agentspace.storage.protocols import Storage, UsageStoreSink
from agentspace.testing import gateway_client, make_config
from agentspace.transports import state
from tests.conftest import wait_until
from tests.test_audit28s_outside import ui_chat, user
from tests.test_clients import add_client, message, reservation_of, spend_of
from tests.test_plugin_author import inspected_sections, installed_package
from tests.test_sink_isolation import start_client, stored_usage, ws_turn


class Hangs:
    """A sink that never finishes ``start`` nor ``aclose``, beside one that works."""

    name = "hangs"
    drain_seconds = 1.0  # its queued record is not waited for the default 5 s at shutdown (a bounded drain still)

    def __init__(self) -> None:
        self.got: list[str] = []

    async def start(self) -> None:
        await asyncio.sleep(3600)

    async def record(self, record: UsageRecord) -> None:
        self.got.append(record.id)

    async def aclose(self) -> None:
        await asyncio.sleep(3600)


class Works:
    name = "works"

    def __init__(self) -> None:
        self.got: list[str] = []

    async def record(self, record: UsageRecord) -> None:
        self.got.append(record.id)


class Sinks:
    def __init__(self, *sinks: object) -> None:
        self.sinks = sinks

    @hookimpl
    def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
        for sink in self.sinks:
            register(sink)


async def test_a_sink_hanging_in_start_or_aclose_neither_keeps_the_server_down_nor_up(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    hangs, works = Hangs(), Works()
    started = time.monotonic()
    client = await start_client(make_client, Sinks(hangs, works))
    assert time.monotonic() - started < 10  # the server listens though one sink's start never ends
    frames, took = await ws_turn(client, token, "hello")
    assert frames[-1]["type"] == "chat.stream.end" and took < 5
    await wait_until(lambda: _true(len(works.got) == 1))
    assert works.got == sorted(await stored_usage(client))
    assert hangs.got == []  # no record before its start ended: it was not ready for one
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 15  # a drain (1 s) and a bounded aclose (5 s), not for ever


async def _true(value: bool) -> bool:
    return value


# Installed plugins a real `agentspace serve` loads through its entry point: each stops the start with one
# line naming the plugin and the hook, as a misspelt hook does (tests/test_plugin_author.py).
STARTUP_RAISES = """
from agentspace import hookimpl

@hookimpl
async def server_startup(app, config):
    raise RuntimeError("cannot reach the license server")
"""

WRONG_KIND = """
from agentspace import hookimpl

@hookimpl
def register_providers(register, config):
    register("shout")  # the class's name, not a provider
"""

# A section named as one the core builds itself: its text would be built for every call and never sent.
CORE_NAME = """
from agentspace import ContextSection, hookimpl

@hookimpl
def register_context_sections(register, config):
    register(ContextSection("tools", lambda request: "How to use our tools."))
"""

SAME_PREFIX = """
from agentspace import ChatMessage, ProviderFinish, TextPart, hookimpl

class Shout:
    def __init__(self, name, listed):
        self.name, self.listed = name, listed

    def claims(self, model):
        return model.startswith("shout/")

    def models(self):
        return self.listed

    async def stream(self, request):
        yield ProviderFinish("stop", None, ChatMessage("assistant", [TextPart("")]))

@hookimpl
def register_providers(register, config):
    register(Shout("shout", ["shout/small"]))
    register(Shout("loud", []))
"""


@pytest.mark.parametrize(
    ("module", "said"),
    [
        (
            STARTUP_RAISES,
            "Error: plugin 'agentspace_oops' failed in server_startup: RuntimeError: cannot reach the license server",
        ),
        (
            WRONG_KIND,
            "Error: plugin 'agentspace_oops' failed in register_providers: TypeError: registered 'shout' (str), "
            "which is not a provider (name: str, claims(model), stream(request))",
        ),
        (SAME_PREFIX, "Error: providers 'loud' and 'shout' both claim 'shout/small' (listed by 'shout')"),
        (
            CORE_NAME,
            "Error: plugin 'agentspace_oops' failed in register_context_sections: ValueError: a section named "
            "'tools' is one the gateway builds itself",
        ),
    ],
    ids=["startup-raises", "wrong-kind", "same-prefix", "core-section-name"],
)
def test_a_plugin_that_breaks_the_start_is_named(tmp_path: Path, module: str, said: str) -> None:
    env = installed_package(tmp_path, "agentspace-oops", module)
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert said in done.stderr, done.stderr
    assert "listening" not in done.stdout


class WithoutMethod:
    """A store of a backend written before one of its protocol's methods (``UsageStoreAPI.spend``,
    ``SessionStoreAPI.set_aside``): the tinydb store without it."""

    def __init__(self, store: Any, missing: str) -> None:
        self._store = store
        self._missing = missing

    def __getattr__(self, name: str) -> Any:
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._store, name)


class OlderBackend:
    name = "older"

    def open(self, config: Config) -> Storage:
        usage = WithoutMethod(UsageStore(config.data_dir), "spend")
        sink = UsageStoreSink(usage, self.name)  # type: ignore[arg-type]
        sessions = WithoutMethod(SessionStore(config.data_dir), "set_aside")
        return Storage(self.name, sessions, usage, sink=sink)  # type: ignore[arg-type]


class Older:
    @hookimpl
    def register_storage_backends(self, register: Callable[[Any], None], config: Config) -> None:
        register(OlderBackend())


async def older_client(make_client: Any) -> Any:
    pm = create_plugin_manager()
    pm.register(Older())
    return await make_client(pm=pm, storage={"backend": "older"})


async def test_a_backend_without_set_aside_still_sets_an_edits_later_answers_aside(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """docs/plugins.md (register_storage_backends): the messages are then set aside one ``update_message`` each."""
    client = await older_client(make_client)
    assert not hasattr(client.app[state.REGISTRY].sessions, "set_aside")
    for n in range(3):
        await ui_chat(client, auth_headers, {"id": "s", "messages": [user(f"u{n}", f"question {n}")]})
    await ui_chat(client, auth_headers, {"id": "s", "messages": [user("u1", "second, edited")]})
    session = (await (await client.get("/api/sessions/s", headers=auth_headers)).json())["session"]
    assert [m["content"] for m in session["messages"]][::2] == ["question 0", "second, edited"]
    assert session["messageCount"] == 4
    await client.close()
    stored = SessionStore(Path(os.environ["AGENTSPACE_HOME"])).get_sync("s")
    assert stored is not None and [bool(m.get("replaced")) for m in stored["messages"]] == [
        *[False] * 3,
        *[True] * 3,
        False,
    ]


async def test_a_backend_without_spend_still_keeps_budgets_across_a_restart(
    make_client: Any, fake_anthropic: Any
) -> None:
    """docs/plugins.md (register_storage_backends): the spend is then summed from ``records``."""
    first = await older_client(make_client)
    assert not hasattr(first.app[state.REGISTRY].usage, "spend")
    one = reservation_of(first)
    key = add_client("alice", "--budget", f"{one * 1.05:.10f}", "--period", "total")
    assert (await message(first, key)).content
    spent = await spend_of(first, "alice")
    assert spent > 0
    with pytest.raises(anthropic.RateLimitError, match="BUDGET_EXCEEDED"):
        await message(first, key)  # in this process: the settled spend
    await first.close()

    second = await older_client(make_client)
    with pytest.raises(anthropic.RateLimitError, match="BUDGET_EXCEEDED") as e:
        await message(second, key)  # a new process: the spend read back through records()
    assert f"spent {usd(spent)}," in str(e.value)


class WrongReturns:
    """A section whose ``build`` returns a list, and a formatting prompt that is a number or raises."""

    def __init__(self, formatting: Any) -> None:
        self.formatting = formatting

    @hookimpl
    def register_context_sections(self, register: Callable[[Any], None], config: Config) -> None:
        register(ContextSection("facts", lambda request: ["the sky is blue", "water is wet"]))
        register(ContextSection("notes", lambda request: "Remember the milk."))

    @hookimpl
    def formatting_prompt(self, config: Config, model: str) -> Any:
        if isinstance(self.formatting, Exception):
            raise self.formatting
        return self.formatting


@pytest.mark.parametrize("formatting", [42, RuntimeError("no prompt today")], ids=["number", "raises"])
async def test_a_wrong_return_at_run_time_is_left_out_and_the_chat_answers(
    tmp_path: Path, fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch, formatting: Any
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789abcdef")
    names, reply = await inspected_sections(tmp_path, fake_anthropic, WrongReturns(formatting))
    sent = fake_anthropic.requests[-1].body["system"]
    system = sent if isinstance(sent, str) else "".join(block["text"] for block in sent)
    assert "Remember the milk." in system
    assert "the sky is blue" not in system  # not the list's repr: a section is text
    sizes = {s["name"]: s["byteCount"] for s in reply["sections"]}
    assert sizes["facts"] == 0 and sizes["notes"] == len("Remember the milk.")
    default = make_config(tmp_path / "defaults")["chat"]["formatting_prompt"]
    assert sizes["response_format"] == len(default.encode())  # the built-in prompt, not "42" nor nothing
    assert default in system and "42" not in system


class ShutdownRaises:
    @hookimpl
    def server_shutdown(self) -> None:
        raise RuntimeError("could not say goodbye")


class ShutdownCounts:
    def __init__(self) -> None:
        self.called = 0

    @hookimpl
    async def server_shutdown(self, app: Any) -> None:
        self.called += 1


class Closes(Works):
    """Takes records only from its second try, so one waits in its queue when the server stops."""

    name = "closes"
    retry_max_seconds = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0
        self.closed = False

    async def record(self, record: UsageRecord) -> None:
        self.tries += 1
        if self.tries == 1:
            raise OSError("not yet")
        self.got.append(record.id)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_server_shutdown_that_raises_still_lets_the_sinks_drain_and_the_others_run(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    sink, counts = Closes(), ShutdownCounts()
    client = await start_client(make_client, Sinks(sink), ShutdownRaises(), counts)
    frames, _ = await ws_turn(client, token, "hello")
    assert frames[-1]["type"] == "chat.stream.end"
    stored = await stored_usage(client)
    await wait_until(lambda: _true(sink.tries >= 1))
    await client.close()
    assert counts.called == 1  # pluggy's order puts it before or after the one that raised: it ran
    assert sorted(sink.got) == sorted(stored) and sink.closed  # the queue drained, the sink closed


class SlowSections:
    """A section whose ``build`` waits on a service that never answers, beside one that answers."""

    @hookimpl
    def register_context_sections(self, register: Callable[[Any], None], config: Config) -> None:
        async def search(request: Any) -> str:
            await asyncio.sleep(3600)
            return "never"

        register(ContextSection("search", search))
        register(ContextSection("notes", lambda request: "Remember the milk."))


async def test_a_section_that_never_answers_is_left_out_after_its_timeout_and_the_chat_answers(
    tmp_path: Path, fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789abcdef")
    config = make_config(
        tmp_path, providers={"anthropic": {"base_url": fake_anthropic.url}}, chat={"section_timeout_seconds": 0.2}
    )
    async with gateway_client(config, SlowSections()) as client:
        resp = await client.post(
            "/api/chat",
            json={"id": "s1", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]},
        )
        body = await resp.text()
        assert resp.status == 200 and '"type":"finish"' in body, body
        reply = await (await client.get("/api/sessions/s1/context")).json()  # the inspector builds them too
    sent = fake_anthropic.requests[-1].body["system"]
    system = sent if isinstance(sent, str) else "".join(block["text"] for block in sent)
    assert "Remember the milk." in system and "never" not in system
    sizes = {s["name"]: s["byteCount"] for s in reply["sections"]}
    assert sizes["search"] == 0 and sizes["notes"] == len("Remember the milk.")
    assert "context section 'search' took more than 0.2 s" in caplog.text


def test_section_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat.section_timeout_seconds"):
        make_config(tmp_path, chat={"section_timeout_seconds": 0})
