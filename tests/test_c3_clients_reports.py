"""The clients file and the usage reports across processes and days, from outside: a served gateway
(``agentspace serve`` in its own process) taking calls from client keys while the CLI (another process's
code, through click's runner) adds, rotates, changes and removes clients; reports read while the server
writes; ``doctor``, ``usage`` and ``clients`` against the data directory a running server holds.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner, Result

from agentspace.cli import main
from agentspace.clients import hash_key
from scripts.harness import GatewayProcess


def cli(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(data_dir), *args])


async def run_cli(data_dir: Path, *args: str) -> Result:
    # The CLI in a thread of its own: the test's loop keeps calling the server meanwhile.
    return await asyncio.to_thread(cli, data_dir, *args)


async def status_with(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


# --- 1. the clients file written by the server (last use) and the CLI at once ----------------------


async def test_cli_changes_made_while_the_server_notes_last_uses_all_hold(tmp_path: Path, fake_anthropic: Any) -> None:
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    await gateway.start()
    data = gateway.data_dir
    rng = random.Random(7)
    live: dict[str, str] = {}  # name -> its current key
    old: list[str] = []  # keys rotated away or of removed clients
    budgets: dict[str, str] = {}
    changing: set[str] = set()  # clients the CLI is changing: not called meanwhile (an old key's 401s would
    # get the loopback address refused as a guesser of keys)
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:

            async def caller() -> None:
                # Every key the CLI hands out is used at once: its first use is a last-use write by the server,
                # racing the CLI's next change.
                while not stop.is_set():
                    for name, key in list(live.items()):
                        if name not in changing:
                            await status_with(session, gateway.url, key)
                    await asyncio.sleep(0)

            callers = [asyncio.create_task(caller()) for _ in range(3)]
            for i in range(60):
                op = "add" if len(live) < 3 else rng.choice(["add", "rotate", "rotate", "set", "remove"])
                name = f"team-{i}" if op == "add" else rng.choice(sorted(live))
                changing.add(name)
                await asyncio.sleep(0.01)  # calls already made with its key answered
                if op == "add":
                    result = await run_cli(data, "clients", "add", name)
                    assert result.exit_code == 0, result.output
                    live[name] = result.stdout.strip()
                elif op == "rotate":
                    result = await run_cli(data, "clients", "rotate", name)
                    assert result.exit_code == 0, result.output
                    old.append(live[name])
                    live[name] = result.stdout.strip()
                elif op == "set":
                    budgets[name] = f"{rng.randint(1, 999)}.5"
                    result = await run_cli(data, "clients", "set", name, "--budget", budgets[name])
                    assert result.exit_code == 0, result.output
                else:
                    result = await run_cli(data, "clients", "remove", name)
                    assert result.exit_code == 0, result.output
                    old.append(live.pop(name))
                    budgets.pop(name, None)
                changing.discard(name)
                # The file is whole after every change (never a half-written or emptied file).
                json.loads((data / "clients.json").read_text(encoding="utf-8"))
            stop.set()
            await asyncio.gather(*callers)
            await asyncio.sleep(0.5)  # the last touches written

            stored = json.loads((data / "clients.json").read_text(encoding="utf-8"))["clients"]
            assert sorted(stored) == sorted(live)
            for name, key in live.items():
                assert stored[name]["keyHash"] == hash_key(key), name
                assert stored[name]["lastUsedAt"], name  # its use was noted
                if name in budgets:
                    assert stored[name]["budgetUsd"] == float(budgets[name]), name
            for key in live.values():
                assert await status_with(session, gateway.url, key) == 200
            for key in old[-8:]:  # 401, or 429 once the callers' few 401s got the address refused for a while
                assert await status_with(session, gateway.url, key) in (401, 429)
        listed = json.loads((await run_cli(data, "clients", "list", "--json")).stdout)
        assert sorted(c["name"] for c in listed["clients"]) == sorted(live)
    finally:
        stop.set()
        await gateway.aclose()
