"""The path from one user to a team, through the real interfaces: a served gateway (``agentspace serve`` in
its own process, or the app on 127.0.0.1), the CLI through click's runner or as a subprocess, and a real
PostgreSQL for ``storage migrate``.

Replicas' token from the environment, client keys that survive ``storage migrate``, ``--models none``, a
typo'd model answered MODEL_NOT_FOUND with a suggestion everywhere, ``chat`` across a server restart, with
a wrong token and with ``serve --port``, and ``agentspace ask``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result

from agentspace.cli import main
from agentspace.storage.postgres import PostgresClientStore, PostgresDatabase
from scripts.harness import ROOT, GatewayProcess, child_env
from tests.fakes.anthropic_upstream import error_event as fa_error_event
from tests.fakes.anthropic_upstream import text_response

ENV_TOKEN = "replica-token-0123456789abcdef"
TYPO = "anthropic/claude-sonet-4-6"
SUGGESTED = "Did you mean 'anthropic/claude-sonnet-4-6'?"


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, input=input)


async def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    # The CLI runs its own event loop: a thread of its own while the test's loop keeps serving.
    return await asyncio.to_thread(invoke, *args, env=env, input=input)


async def served(tmp_path: Path, upstream_url: str, **sections: dict[str, Any]) -> GatewayProcess:
    gateway = GatewayProcess(tmp_path / "data", upstream_url, **sections)
    await gateway.start()
    return gateway


# --- 1. replicas: the token in the environment ---------------------------------------------------


async def test_token_and_chat_follow_the_gateway_token_variable(
    tmp_path: Path, fake_anthropic: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", ENV_TOKEN)
    gateway = await served(tmp_path, fake_anthropic.url)
    try:
        assert gateway.process is not None and gateway.process.stdout is not None
        banner = (await gateway.process.stdout.readline()).decode()
        assert "AGENTSPACE_GATEWAY_TOKEN" in banner and "run `agentspace token`" not in banner

        env = {"AGENTSPACE_HOME": str(gateway.data_dir)}
        printed = await run_cli("token", env=env)
        assert printed.exit_code == 0 and printed.stdout.strip() == ENV_TOKEN
        rotate = await run_cli("token", "--rotate", env=env)
        assert rotate.exit_code == 1 and "AGENTSPACE_GATEWAY_TOKEN" in rotate.output

        fake_anthropic.enqueue(text_response("Hello from the replica."))
        # No --url, no --token: the address `serve --port 0` announced, the variable's token.
        chatted = await run_cli("chat", env=env, input="hi\n")
        assert chatted.exit_code == 0, chatted.output
        assert "Hello from the replica." in chatted.stdout
    finally:
        await gateway.terminate()
        await gateway.aclose()


async def test_a_second_server_stopped_gives_the_cli_back_the_first_one_s_address(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str
) -> None:
    """``chat`` and ``ask`` dial the address the data directory's server announced. On PostgreSQL two replicas
    may share one data directory (no lock: the data is in the database); the second announces its own address,
    and once it stops, the CLI finds the first one again, not a dead port."""
    storage = {"backend": "postgres", "dsn": pg_dsn}
    first = await served(tmp_path, fake_anthropic.url, storage=storage)
    try:
        second = GatewayProcess(first.data_dir, fake_anthropic.url, storage=storage)
        try:
            await second.start()
            assert (first.data_dir / "server-address").read_text().strip() == second.ws_url
            assert await second.terminate() == 0
        finally:
            await second.aclose()
        assert (first.data_dir / "server-address").read_text().strip() == first.ws_url
        fake_anthropic.enqueue(text_response("Still here."))
        chatted = await run_cli("ask", "hi", env={"AGENTSPACE_HOME": str(first.data_dir)})
        assert chatted.exit_code == 0, chatted.output
        assert "Still here." in chatted.stdout
    finally:
        await first.terminate()
        await first.aclose()


# --- 2. storage migrate keeps the client keys ----------------------------------------------------


async def test_migrate_copies_client_keys_that_keep_working(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, monkeypatch: Any
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("AGENTSPACE_HOME", str(data_dir))
    added = await run_cli("clients", "add", "team-a", "--budget", "5", "--period", "day", "--models", "anthropic/*")
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    assert (await run_cli("clients", "add", "team-b")).exit_code == 0

    first = await run_cli("storage", "migrate", "--to", pg_dsn)
    assert first.exit_code == 0, first.output
    assert "clients: 2 copied, 0 already there" in first.output
    again = await run_cli("storage", "migrate", "--to", pg_dsn)
    assert "clients: 0 copied, 2 already there" in again.output

    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\ndata_dir = "{data_dir}"\n')
    listed = await run_cli("clients", "list", "--config", str(config), "--json")
    assert listed.exit_code == 0, listed.output
    clients = {c["name"]: c for c in json.loads(listed.stdout)["clients"]}
    assert set(clients) == {"team-a", "team-b"}
    assert clients["team-a"]["budget"] == {"usd": 5.0, "period": "day"} and clients["team-a"]["models"] == [
        "anthropic/*"
    ]

    db = PostgresDatabase(pg_dsn)
    await db.start()
    try:
        assert (await PostgresClientStore(db).get_by_key(key)).name == "team-a"
    finally:
        await db.aclose()

    # A gateway on the database lets team-a in with the key it had before.
    gateway = await served(tmp_path, fake_anthropic.url, storage={"backend": "postgres", "dsn": pg_dsn})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.url}/api/models", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
            async with http.get(f"{gateway.url}/api/models", headers={"Authorization": "Bearer as-wrong"}) as r:
                assert r.status == 401
    finally:
        await gateway.terminate()
        await gateway.aclose()


async def test_migrate_names_a_client_the_database_has_under_another_key(tmp_path: Path, pg_dsn: str) -> None:
    """A client added on the database before the migration keeps the key it got there: migrate says so, and
    after ``clients remove`` there a second run carries the data directory's key over."""
    data_dir = tmp_path / "data"
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\ndata_dir = "{tmp_path / "pg-data"}"\n')
    old = await run_cli("--data-dir", str(data_dir), "clients", "add", "team-a")
    assert old.exit_code == 0, old.output
    assert (await run_cli("--config", str(config), "clients", "add", "team-a")).exit_code == 0

    first = await run_cli("storage", "migrate", "--data-dir", str(data_dir), "--to", pg_dsn)
    assert first.exit_code == 0, first.output
    assert "clients: 0 copied, 1 already there" in first.stdout
    assert "client 'team-a' is in the database already, with another key" in first.stderr
    assert "agentspace clients remove team-a" in first.stderr

    db = PostgresDatabase(pg_dsn)
    await db.start()
    try:
        assert await PostgresClientStore(db).get_by_key(old.stdout.strip()) is None
        assert (await run_cli("--config", str(config), "clients", "remove", "team-a")).exit_code == 0
        again = await run_cli("storage", "migrate", "--data-dir", str(data_dir), "--to", pg_dsn)
        assert "clients: 1 copied, 0 already there" in again.stdout and again.stderr == ""
        assert (await PostgresClientStore(db).get_by_key(old.stdout.strip())).name == "team-a"
    finally:
        await db.aclose()


# --- 4. ./scripts/test installs into a venv of its own -------------------------------------------


def test_scripts_test_installs_only_into_its_own_venv() -> None:
    """Running the whole suite must leave the Quick start's .venv as it was: the script makes and activates
    .venv-test (or $AGENTSPACE_TEST_VENV) before its first install, and every install runs through that
    venv's python. (Running the script itself here would install everything and run the whole suite.)"""
    lines = [line.strip() for line in (ROOT / "scripts" / "test").read_text().splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    assert 'venv="${AGENTSPACE_TEST_VENV:-.venv-test}"' in code
    activate = code.index('. "$venv/bin/activate"')
    assert code.index('python3 -m venv "$venv"') < activate
    installs = [n for n, line in enumerate(code) if "pip " in line or "pip3 " in line]
    assert installs and min(installs) > activate
    assert all(code[n].startswith("python -m pip install") for n in installs), [code[n] for n in installs]
    assert not any(".venv/" in line or ".venv " in line for line in code)


# --- 5. clients set --models none ----------------------------------------------------------------


def test_models_none_clears_the_allowlist() -> None:
    assert invoke("clients", "add", "team-a", "--models", "anthropic/claude-haiku-*").exit_code == 0
    shown = json.loads(invoke("clients", "show", "team-a", "--json").stdout)
    assert shown["models"] == ["anthropic/claude-haiku-*"]
    changed = invoke("clients", "set", "team-a", "--models", "none")
    assert changed.exit_code == 0, changed.output
    assert json.loads(invoke("clients", "show", "team-a", "--json").stdout)["models"] == []
    assert "every model" in invoke("clients", "set", "--help").stdout


async def test_a_client_cleared_with_models_none_may_call_any_model(make_client: Any, fake_anthropic: Any) -> None:
    """What the client sees: refused a model outside its allowlist, then served once ``--models none``."""
    added = await run_cli("clients", "add", "team-a", "--models", "anthropic/claude-haiku-*")
    headers = {"Authorization": f"Bearer {added.stdout.strip()}"}
    client = await make_client()
    body = {"model": "anthropic/claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    refused = await client.post("/v1/messages", json=body, headers=headers)
    assert refused.status == 403, await refused.text()
    assert (await run_cli("clients", "set", "team-a", "--models", "none")).exit_code == 0
    fake_anthropic.enqueue(text_response("Any model now."))
    served_now = await client.post("/v1/messages", json=body, headers=headers)
    assert served_now.status == 200, await served_now.text()
    assert (await served_now.json())["content"][0]["text"] == "Any model now."


# --- 6. a typo'd model ---------------------------------------------------------------------------


async def test_a_typod_model_is_model_not_found_with_a_suggestion_everywhere(
    client: TestClient, auth_headers: dict[str, str], isolated_env: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")  # the typo is found before the key is looked for
    async with client.ws_connect("/gateway", headers=auth_headers) as ws:
        await ws.send_json({"type": "chat.send", "id": "1", "content": "hi", "model": TYPO})
        frame = await ws.receive_json()
    assert frame["type"] == "error" and frame["code"] == "MODEL_NOT_FOUND" and SUGGESTED in frame["message"]

    body = {
        "id": "s1",
        "model": TYPO,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    r = await client.post("/api/chat", json=body, headers=auth_headers)
    error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "MODEL_NOT_FOUND" and SUGGESTED in error["message"]

    r = await client.post(
        "/v1/chat/completions",
        json={"model": TYPO, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth_headers,
    )
    assert r.status == 404 and SUGGESTED in (await r.json())["error"]["message"]

    r = await client.post(
        "/v1/messages",
        json={"model": "openai/gpt-4o-mni", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth_headers,
    )
    assert r.status == 404 and "Did you mean 'openai/gpt-4o-mini'?" in (await r.json())["error"]["message"]
    r = await client.post(  # an Anthropic model on the pass-through: answered before it goes upstream
        "/v1/messages",
        json={"model": "claude-sonet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth_headers,
    )
    assert r.status == 404 and SUGGESTED in (await r.json())["error"]["message"]

    url = str(client.make_url("/gateway")).replace("http://", "ws://")
    chatted = await run_cli(
        "chat", "--url", url, "--model", TYPO, input="hi\n", env={"AGENTSPACE_HOME": str(isolated_env)}
    )
    assert chatted.exit_code == 1 and "MODEL_NOT_FOUND" in chatted.output and SUGGESTED in chatted.output
    asked = await run_cli("ask", "--url", url, "--model", TYPO, "hi", env={"AGENTSPACE_HOME": str(isolated_env)})
    assert asked.exit_code == 1 and SUGGESTED in asked.output


async def test_known_and_declared_models_are_not_typos(make_client: Any, auth_headers: dict[str, str]) -> None:
    client = await make_client(pricing={"anthropic/claude-next": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})
    for model in ("anthropic/claude-haiku-4-5", "anthropic/claude-next"):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers=auth_headers,
        )
        assert r.status == 200, (model, await r.text())


# --- 9. chat: a restart, a wrong token ------------------------------------------------------------


async def test_chat_refuses_a_wrong_token_before_the_first_message(client: TestClient, isolated_env: Path) -> None:
    url = str(client.make_url("/gateway")).replace("http://", "ws://")
    result = await run_cli("chat", "--url", url, "--token", "wrong-token-0123456789", input="hi\n")
    assert result.exit_code == 1
    assert "refused the token" in result.output and "Connected" not in result.output


async def test_chat_takes_the_bare_address_ask_takes(client: TestClient, isolated_env: Path) -> None:
    """``--url wss://gateway.example.com`` (no path) works with ``ask``; ``chat`` dialled the web app and said
    "WebSocket handshake failed (HTTP 200). Is it an agentspace gateway?"."""
    bare = str(client.make_url("/")).replace("http://", "ws://")
    result = await run_cli("chat", "--url", bare, "--token", "wrong-token-0123456789", input="hi\n")
    assert result.exit_code == 1
    assert "refused the token" in result.output and "handshake" not in result.output


async def test_chat_survives_a_server_restart(tmp_path: Path, fake_anthropic: Any) -> None:
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    await gateway.start()
    port = gateway.url.rsplit(":", 1)[1]
    # The restarted server must come back on the same port: pin it in the config (`--port 0` is the harness's).
    fake_anthropic.enqueue(text_response("First answer."), text_response("Second answer."))
    chat = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentspace",
        "chat",
        "--url",
        gateway.ws_url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(gateway.data_dir),
        cwd=ROOT,
    )
    assert chat.stdin is not None and chat.stdout is not None
    try:
        chat.stdin.write(b"one\n")
        await chat.stdin.drain()
        assert b"First answer." in await asyncio.wait_for(chat.stdout.readline(), 30)
        assert await gateway.terminate() == 0
        chat.stdin.write(b"two\n")  # typed while the gateway is down: it waits for it
        await chat.stdin.drain()
        await asyncio.sleep(1.0)
        restarted = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentspace",
            "serve",
            "--config",
            str(gateway.config_path),
            "--port",
            port,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=child_env(gateway.data_dir),
            cwd=ROOT,
        )
        try:
            assert b"Second answer." in await asyncio.wait_for(chat.stdout.readline(), 60)
            chat.stdin.close()
            assert await asyncio.wait_for(chat.wait(), 30) == 0
            assert chat.stderr is not None
            assert "reconnecting" in (await chat.stderr.read()).decode()
        finally:
            restarted.terminate()
            await restarted.wait()
    finally:
        if chat.returncode is None:
            chat.kill()
            await chat.wait()
        await gateway.aclose()
    assert len(fake_anthropic.requests) == 2
    # Both messages went to one session: the second call carried the first exchange.
    assert len(fake_anthropic.requests[-1].body["messages"]) == 3


# --- ask ------------------------------------------------------------------------------------------


async def test_ask_streams_reads_stdin_and_takes_a_system_prompt(
    client: TestClient, fake_anthropic: Any, isolated_env: Path
) -> None:
    url = str(client.make_url("/gateway")).replace("http://", "ws://")
    env = {"AGENTSPACE_HOME": str(isolated_env)}
    fake_anthropic.enqueue(text_response("Forty-two.", usage={"input_tokens": 11}, delta_usages=[{"output_tokens": 3}]))
    asked = await run_cli(
        "ask",
        "--url",
        url,
        "-m",
        "anthropic/claude-haiku-4-5",
        "--system",
        "Be brief.",
        "Summarise:",
        input="the text\n",
        env=env,
    )
    assert asked.exit_code == 0, asked.output
    assert asked.stdout == "Forty-two.\n"
    assert "11 in / 3 out tokens" in asked.stderr
    request = fake_anthropic.requests[-1].body
    assert request["model"] == "claude-haiku-4-5"
    assert "Be brief." in json.dumps(request["system"])
    assert request["messages"][-1]["content"][0]["text"] == "Summarise:\n\nthe text"

    usage = json.loads((await run_cli("usage", "--json", env=env)).stdout)
    assert usage["grandTotal"]["totalTokens"] == 14  # one call, one record

    # Without --model: the gateway's default (this CLI's own config would say claude-sonnet-4-6).
    fake_anthropic.enqueue(text_response("Default."))
    plain = await run_cli("ask", "--url", url, "Hi", env=env)
    assert plain.exit_code == 0 and plain.stdout == "Default.\n", plain.output
    assert fake_anthropic.requests[-1].body["model"] == "claude-sonnet-4-5"

    bad = await run_cli("ask", "--url", url, "--token", "wrong-token-0123456789", "hi", env=env)
    assert bad.exit_code == 1 and "refused the token" in bad.output
    nothing = await run_cli("ask", "--url", url, env=env, input="")
    assert nothing.exit_code == 2


async def test_ask_prints_each_delta_as_it_comes_and_exits_1_when_the_answer_breaks(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """``agentspace ask`` as a program: the first words are on its stdout while the upstream still streams the
    rest; an upstream error after some text keeps that text and exits 1 with the error."""
    gateway = await served(tmp_path, fake_anthropic.url)
    words = [f"w{n} " for n in range(8)]
    fake_anthropic.enqueue(
        text_response("".join(words), chunks=words).with_delay(0.4),
        fa_error_event("api_error", "The upstream broke.", text="Partial "),
    )
    try:
        ask = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentspace", "ask", "--url", gateway.ws_url, "Count.",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(gateway.data_dir), cwd=ROOT,
        )  # fmt: skip
        assert ask.stdout is not None and ask.stderr is not None
        first = await asyncio.wait_for(ask.stdout.read(3), 30)
        assert first == b"w0 " and ask.returncode is None  # printed while the answer goes on
        rest = await asyncio.wait_for(ask.stdout.read(), 30)
        assert await ask.wait() == 0 and (first + rest).decode() == "".join(words) + "\n"

        broken = await run_cli("ask", "--url", gateway.ws_url, "Again.", env=child_env(gateway.data_dir))
        assert broken.exit_code == 1, broken.output
        assert broken.stdout == "Partial \n" and "The upstream broke." in broken.stderr
    finally:
        await gateway.terminate()
        await gateway.aclose()


def test_ask_says_when_no_gateway_runs(tmp_path: Path) -> None:
    result = invoke("ask", "--url", "ws://127.0.0.1:9/gateway", "hi", env={"AGENTSPACE_HOME": str(tmp_path)})
    assert result.exit_code == 1 and "Cannot reach the gateway" in result.output
    assert os.environ.get("AGENTSPACE_GATEWAY_TOKEN") is None


# --- 10. the benchmarks run without pytest --------------------------------------------------------


def test_the_fake_upstreams_import_without_pytest() -> None:
    """benchmarks/vs_litellm.py starts the fakes as scripts after a plain `pip install -e .`."""
    import subprocess

    code = (
        "import sys; sys.modules['pytest'] = None; "  # importing pytest now fails, as where it is not installed
        "import tests.fakes.anthropic_upstream, tests.fakes.openai_upstream; "
        "sys.argv = ['vs_litellm.py', '--help']; import runpy; runpy.run_path('benchmarks/vs_litellm.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_the_readme_lists_every_command_and_no_retired_model() -> None:
    import re

    from agentspace.catalog import is_retired
    from agentspace.config import parse_config
    from agentspace.pricing import model_info

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Commands") : readme.index("## Configuration")]
    rows = {m.group(1): line for line in table.splitlines() if (m := re.match(r"\| `agentspace (\w+)", line))}
    ctx = click.Context(main)
    commands = set(main.list_commands(ctx))  # the plugins' commands too: none load in the tests
    assert commands <= set(rows), commands - set(rows)
    for name in ("chat", "ask"):
        command = main.get_command(ctx, name)
        assert command is not None
        options = {o for p in command.params for o in p.opts if o.startswith("--")}
        missing = {o for o in options - {"--config", "--data-dir", "--help"} if o not in rows[name]}
        assert not missing, (name, missing)

    config = parse_config({}, "<readme>")
    shown = set(re.findall(r"\banthropic/claude-[a-z0-9.-]*[a-z0-9]", readme))
    assert shown
    retired = {m for m in shown if is_retired(model_info(config, m).deprecation_date)}
    assert not retired, retired


# --- 3. serve --workers without the config ---------------------------------------------------------


def test_workers_without_a_config_say_the_config_is_missing(tmp_path: Path) -> None:
    result = invoke("--data-dir", str(tmp_path / "d"), "serve", "--workers", "2")
    assert result.exit_code == 1 and "no config file was given (--config FILE)" in result.output
    config = tmp_path / "c.toml"
    config.write_text('[storage]\nbackend = "tinydb"\n')
    named = invoke("--data-dir", str(tmp_path / "d"), "serve", "--config", str(config), "--workers", "2")
    assert named.exit_code == 1 and f"in {config}" in named.output


# --- 8. fallback-priced costs are marked, with the reason ------------------------------------------


async def test_fallback_priced_costs_are_marked_in_chat_and_every_usage_table(
    make_client: Any, fake_anthropic: Any, isolated_env: Path
) -> None:
    client = await make_client(providers={"anthropic": {"models": ["claude-in-house"]}})
    url = str(client.make_url("/gateway")).replace("http://", "ws://")
    env = {"AGENTSPACE_HOME": str(isolated_env)}
    fake_anthropic.enqueue(text_response("Priced by guess.", usage={"input_tokens": 1000}))
    chatted = await run_cli("chat", "--url", url, "--model", "anthropic/claude-in-house", input="hi\n", env=env)
    assert chatted.exit_code == 0, chatted.output
    cost_line = next(line for line in chatted.stderr.splitlines() if "out tokens" in line)
    assert "*]" in cost_line and "* price unknown: costed at the fallback price" in chatted.stderr
    for flag in ("--by-model", "--by-day", "--by-client"):
        report = await run_cli("usage", flag, env=env)
        assert report.exit_code == 0, report.output
        assert "* price unknown" in report.stdout and any(
            line.split()[0].endswith("*") for line in report.stdout.splitlines() if line.strip()
        ), (flag, report.stdout)


async def test_a_command_without_the_postgres_config_is_not_answered_from_the_files(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, monkeypatch: Any
) -> None:
    """The README's replicas: ``agentspace.toml`` names the database, the data directory stays the default.
    ``clients add`` there without that config wrote the data directory's clients file, which the server no longer
    reads: a key printed as added got 401. It now says where the server keeps its clients."""
    data_dir = tmp_path / "data"
    monkeypatch.setenv("AGENTSPACE_HOME", str(data_dir))
    monkeypatch.delenv("AGENTSPACE_CONFIG", raising=False)
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\ndata_dir = "{data_dir}"\n')
    gateway = await served(tmp_path, fake_anthropic.url, storage={"backend": "postgres", "dsn": pg_dsn})
    try:
        for command in (["clients", "add", "team-c"], ["clients", "list"], ["usage"], ["sessions", "list"]):
            refused = await run_cli(*command)
            assert refused.exit_code == 1, (command, refused.output)
            assert "postgres store" in refused.output and "AGENTSPACE_CONFIG" in refused.output
        added = await run_cli("clients", "add", "team-c", "--config", str(config))
        assert added.exit_code == 0, added.output
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {added.stdout.strip()}"}
            async with http.get(f"{gateway.url}/api/models", headers=headers) as r:
                assert r.status == 200
    finally:
        await gateway.terminate()
        await gateway.aclose()

    # The same data directory served from its own files again: the commands read them.
    gateway = await served(tmp_path, fake_anthropic.url)
    try:
        listed = await run_cli("clients", "list")
        assert listed.exit_code == 0, listed.output
    finally:
        await gateway.terminate()
        await gateway.aclose()


async def test_migrate_refuses_while_the_data_directorys_server_runs(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str
) -> None:
    """The README's ``storage migrate``, "once, with the tinydb server stopped": a session continued after its
    copy is "already there" for a second run, so what it said after the first was never copied. A running server
    is named now, and nothing is copied."""
    gateway = await served(tmp_path, fake_anthropic.url)
    data_dir = str(tmp_path / "data")
    try:
        refused = await run_cli("--data-dir", data_dir, "storage", "migrate", "--to", pg_dsn)
        assert refused.exit_code == 1, refused.output
        assert gateway.process is not None
        assert f"(pid {gateway.process.pid})" in refused.output and "stop it, then migrate" in refused.output
    finally:
        await gateway.terminate()
        await gateway.aclose()
    copied = await run_cli("--data-dir", data_dir, "storage", "migrate", "--to", pg_dsn)
    assert copied.exit_code == 0, copied.output


def test_serve_refuses_a_gateway_token_with_a_comment_in_it(tmp_path: Path) -> None:
    """``AGENTSPACE_GATEWAY_TOKEN=... # a comment`` in a systemd EnvironmentFile is all value (a shell that sources
    the file drops the comment): the servers would accept a token nobody has. ``serve`` says so and stops."""
    import subprocess

    token = "replica-token-0123456789abcdef     # python3 -c 'import secrets'"
    env = {**child_env(tmp_path / "data"), "AGENTSPACE_GATEWAY_TOKEN": token}
    done = subprocess.run(
        [sys.executable, "-m", "agentspace", "--data-dir", str(tmp_path / "data"), "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "AGENTSPACE_GATEWAY_TOKEN has a space in it" in done.stderr and "lines of their own" in done.stderr
    assert "import secrets" not in done.stderr  # the value is not echoed


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="root writing another user's data dir")
def test_keys_as_root_in_another_users_data_directory_says_whom_to_run_it_as(tmp_path: Path) -> None:
    """docs/deploy.md: the workers run as ``agentspace``; ``keys add`` as root left a root-owned keys.json that
    their next start refused ("Permission denied ... remove it and add the keys again", which root did again)."""
    data_dir = tmp_path / "service-data"
    data_dir.mkdir()
    os.chown(data_dir, 65534, 65534)
    added = invoke("--data-dir", str(data_dir), "keys", "add", "anthropic", input="sk-ant-test\n")
    assert added.exit_code == 1, added.output
    assert "runuser -u " in added.output and "-- agentspace keys add anthropic" in added.output
    assert not (data_dir / "keys.json").exists()
    removed = invoke("--data-dir", str(data_dir), "keys", "remove", "anthropic")
    assert removed.exit_code == 1 and "-- agentspace keys remove anthropic" in removed.output
    # Root's own data directory is root's to write, and so is one whose server ran as root.
    own = tmp_path / "root-data"
    assert invoke("--data-dir", str(own), "keys", "add", "anthropic", input="sk-ant-test\n").exit_code == 0
    (data_dir / "server-address").write_text("ws://127.0.0.1:3271/gateway\n")
    assert invoke("--data-dir", str(data_dir), "keys", "add", "anthropic", input="sk-ant-test\n").exit_code == 0
