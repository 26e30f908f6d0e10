"""The embedded store's seams met from outside: rollups, ledger journals and the clients table changed the way a
crash, a full disk or an operator changes them, read back through the CLI and the running app."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import UsageStore
from agentspace.storage.reports import REPORTS
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.test_torn_files import killed_mid_call, ws_turn
from tests.test_usage_rollups import rounded, seed


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


# --- usage rollups -------------------------------------------------------------------------------------------


def test_a_rollup_whose_totals_are_not_numbers_is_set_aside_and_the_report_equals_the_scan(
    isolated_env: Path,
) -> None:
    # A rollup is written whole, so one whose totals are a string or a null was edited or damaged from outside.
    # JSON allows it, the rollup's shape is kept: the report must still not add "12" to a number and stop.
    records = seed(isolated_env, random.Random(5))
    first = json.loads(run("usage", "--by-model", "--json").stdout)  # builds the rollups of the past days
    rollups = isolated_env / "usage" / "rollups"
    for name, damage in (("2026-03-01.day.json", "12"), ("2026-03-02.day.json", None)):
        path = rollups / name
        data = json.loads(path.read_text())
        data["day"]["merged"]["groups"][0][6][0] = damage
        path.write_text(json.dumps(data))
    for by, key in (("--by-model", "perModel"), ("--by-day", "perDay"), ("--by-client", "perClient")):
        report = json.loads(run("usage", by, "--json").stdout)
        expected = REPORTS[key[3:].lower()](records)
        assert rounded(report[key]) == rounded(expected[key])
        assert rounded(report["grandTotal"]) == rounded(expected["grandTotal"]) == rounded(first["grandTotal"])
    aside = sorted(p.name.split(".damaged-")[0] for p in rollups.iterdir() if ".damaged-" in p.name)
    assert aside == ["2026-03-01.day.json", "2026-03-01.json", "2026-03-02.day.json", "2026-03-02.json"]


# --- the ledger journal --------------------------------------------------------------------------------------


async def test_a_ledger_journal_whose_last_write_lost_only_its_newline_posts_nothing_for_it(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    # A crash may stop a write anywhere, just before its newline too: what is left of the line then parses. That
    # write was never synced, so its call never left: a pending entry read from it would charge a call never made.
    fake_anthropic.default = fa.text_response("fine", usage={"input_tokens": 55})
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        sid = (await ws_turn(server, "hello"))[0]["sessionId"]
        await killed_mid_call(server, fake_anthropic, sid)
    finally:
        await server.aclose()
    (journal,) = (data_dir / "ledger").glob("journal-*.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    pending = [json.loads(line) for line in lines if b'"event":"pending"' in line][-1]  # the killed call's
    torn = {**pending, "id": "usage_torn", "inputTokens": 999}
    journal.write_bytes(b"".join(lines) + json.dumps(torn, separators=(",", ":")).encode())  # no newline
    before = {r["id"] for r in UsageStore(data_dir).records_sync()}

    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    records = {r["id"]: r for r in UsageStore(data_dir).records_sync()}
    assert set(records) - before == {pending["id"]}  # the killed call, and nothing from the torn line
    assert "usage_torn" not in records
    assert "never finished (a crash) ignored" in server.log()
    assert not list((data_dir / "ledger").glob("journal-*.jsonl*"))  # posted and removed: nothing was damaged


# --- the clients table (tinydb) ------------------------------------------------------------------------------


def edit_client(data_dir: Path, name: str, **changes: Any) -> None:
    """Change a stored client by hand, as an operator with an editor would (the file stays 0600)."""
    path = data_dir / "clients.json"
    data = json.loads(path.read_text())
    data["clients"][name] = changes.pop("whole") if "whole" in changes else {**data["clients"][name], **changes}
    path.write_text(json.dumps(data))


async def test_a_client_with_limits_of_the_wrong_type_is_refused_and_named_not_a_crash(
    isolated_env: Path, make_client: Any, token: str
) -> None:
    # clients.json edited by hand: a budget written as a string, a period that does not exist. The client's key is
    # refused (as for any client that cannot be read), every other client and every listing go on working, and
    # `agentspace doctor` names it.
    bob = run("clients", "add", "bob", "--budget", "5").stdout.strip()
    alice = run("clients", "add", "alice").stdout.strip()
    edit_client(isolated_env, "bob", budgetUsd="5", period="fortnight")
    listed = run("clients", "list").stdout
    assert "alice" in listed and "bob" not in listed
    doctor = CliRunner().invoke(cli, ["doctor"])
    assert doctor.exit_code == 1 and "client 'bob' cannot be read (its key is refused)" in doctor.output

    client: TestClient = await make_client()
    clients = await client.get("/api/clients", headers={"Authorization": f"Bearer {token}"})
    assert clients.status == 200 and [c["name"] for c in (await clients.json())["clients"]] == ["alice"]
    assert (await client.get("/api/usage", headers={"Authorization": f"Bearer {bob}"})).status == 401
    assert (await client.get("/api/usage", headers={"Authorization": f"Bearer {alice}"})).status == 200


def test_a_client_that_cannot_be_read_is_removed_and_added_again_through_the_cli(isolated_env: Path) -> None:
    run("clients", "add", "bob")
    run("clients", "add", "carol")
    edit_client(isolated_env, "bob", whole="not a client")  # damaged from outside
    # Not replaced behind the operator's back, and no traceback: the way out is named.
    added = CliRunner().invoke(cli, ["clients", "add", "bob"])
    assert added.exit_code == 1 and "Traceback" not in added.output, added.output
    assert "agentspace clients remove bob" in added.output
    doctor = CliRunner().invoke(cli, ["doctor"])
    assert "client 'bob' cannot be read" in doctor.output and "agentspace clients remove bob" in doctor.output
    run("clients", "remove", "bob")
    key = run("clients", "add", "bob").stdout.strip()
    assert key.startswith("as-")
    stored = json.loads((isolated_env / "clients.json").read_text())["clients"]
    assert sorted(stored) == ["bob", "carol"] and stored["bob"]["name"] == "bob"
    assert run("doctor").exit_code == 0
