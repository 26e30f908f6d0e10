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


# --- 3. doctor, usage and clients against the data directory a running server holds ----------------


def files_of(data: Path, *skip: str) -> dict[str, bytes]:
    """Every file of the data directory (but those under ``skip``) with its bytes."""
    return {
        str(p.relative_to(data)): p.read_bytes()
        for p in sorted(data.rglob("*"))
        if p.is_file() and not any(str(p.relative_to(data)).startswith(s) for s in skip)
    }


async def test_doctor_names_a_clients_file_the_server_cannot_use_and_changes_nothing(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    await gateway.start()
    data = gateway.data_dir
    clients_file = data / "clients.json"
    try:
        keys = [(await run_cli(data, "clients", "add", name)).stdout.strip() for name in ("ann", "bob")]
        async with aiohttp.ClientSession() as session:
            assert [await status_with(session, gateway.url, key) for key in keys] == [200, 200]
            await asyncio.sleep(0.3)  # the last uses written
            doctor = await run_cli(data, "doctor")
            assert doctor.exit_code == 0, doctor.output
            assert "clients: 2 readable" in doctor.output

            # Writable by others: the server admits no client key; doctor says so, and why.
            clients_file.chmod(0o666)
            before = files_of(data)
            assert await status_with(session, gateway.url, keys[0]) == 401
            doctor = await run_cli(data, "doctor")
            assert doctor.exit_code == 1, doctor.output
            assert f"{clients_file}: writable by other users" in doctor.output
            assert f"chmod 600 {clients_file}" in doctor.output
            assert files_of(data) == before  # doctor only reads
            clients_file.chmod(0o600)
            assert await status_with(session, gateway.url, keys[0]) == 200

            # Damaged (written by hand): doctor names it and leaves it where it is; the server moved it aside at
            # its next lookup, and doctor names the copy.
            good = clients_file.read_bytes()
            clients_file.write_bytes(good[: len(good) // 2])
            doctor = await run_cli(data, "doctor")
            assert doctor.exit_code == 1, doctor.output
            assert f"{clients_file}: not valid JSON" in doctor.output
            assert clients_file.read_bytes() == good[: len(good) // 2]
            assert await status_with(session, gateway.url, keys[1]) == 401
            aside = [p for p in data.iterdir() if p.name.startswith("clients.json.damaged-")]
            assert len(aside) == 1 and not clients_file.exists()
            doctor = await run_cli(data, "doctor")
            assert doctor.exit_code == 1, doctor.output
            assert f"{aside[0]}: damaged clients file" in doctor.output
    finally:
        await gateway.aclose()
