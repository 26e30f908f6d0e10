"""The embedded store's seams met from outside: rollups, ledger journals and the clients table changed the way a
crash, a full disk or an operator changes them, read back through the CLI and the running app."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import UsageStore
from agentspace.storage.embedded.session_journal import JOURNAL_NAME
from agentspace.storage.embedded.usage import write_log_segment
from agentspace.storage.reports import REPORTS
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ws import chat, connect
from tests.test_session_journal_outside import killed_during_a_first_turn
from tests.test_sessions_outside import sent_texts, shown
from tests.test_torn_files import GARBAGE, journal_of_a_killed_call
from tests.test_usage_rollups import random_record, rounded, seed


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
    # (a report by model, day or client reads the day merged without sessions; one by session the other)
    for name, damage in (("2026-03-01.nosession.json", "12"), ("2026-03-02.day.json", None)):
        path = rollups / name
        data = json.loads(path.read_text())
        data["day"]["merged"]["groups"][0][6][0] = damage
        path.write_text(json.dumps(data))
    for by, key in (
        ("--by-model", "perModel"),
        ("--by-day", "perDay"),
        ("--by-client", "perClient"),
        ("--by-session", "perSession"),
    ):
        report = json.loads(run("usage", by, "--json").stdout)
        expected = REPORTS[key[3:].lower()](records)
        assert rounded(report[key]) == rounded(expected[key])
        assert rounded(report["grandTotal"]) == rounded(expected["grandTotal"]) == rounded(first["grandTotal"])
    aside = sorted(p.name.split(".damaged-")[0] for p in rollups.iterdir() if ".damaged-" in p.name)
    assert aside == [f"2026-03-0{day}.{kind}json" for day in (1, 2) for kind in ("day.", "", "nosession.")]


def test_a_rollup_entry_without_its_groups_is_set_aside_not_counted_as_no_records(isolated_env: Path) -> None:
    # Today's closed segment counts through its entry in rollups/<today>.json. An entry whose groups were cut out
    # (an edit that JSON allows) must not count its segment as holding nothing.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rng = random.Random(6)
    records = [random_record(rng, n, today) for n in range(60)]
    write_log_segment(isolated_env, today, 0, records[:40])  # closed: the next one exists
    write_log_segment(isolated_env, today, 1, records[40:])  # open: scanned by every report
    assert json.loads(run("usage", "--json").stdout)["grandTotal"]["requestCount"] == sum(
        r["answered"] is not False for r in records
    )
    path = isolated_env / "usage" / "rollups" / f"{today}.json"
    data = json.loads(path.read_text())
    del data["segments"]["00000.jsonl"]["groups"]
    path.write_text(json.dumps(data))
    for merged in (f"{today}.day.json", f"{today}.nosession.json"):  # (else they answer for the closed segment)
        (path.parent / merged).unlink()
    for by in ("model", "session"):
        report = json.loads(run("usage", f"--by-{by}", "--json").stdout)
        assert rounded(report) == rounded({**REPORTS[by](records), "damagedFiles": []})
    assert list(path.parent.glob(f"{today}.json.damaged-*"))


async def test_a_record_whose_id_is_not_text_is_damage_the_next_records_are_stored_past(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    # Today's last segment, damaged from outside in a way JSON allows: a record's id that is a list. The writer
    # continues that segment after a restart; it must set it aside, not fail every record stored after it.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    damaged = {**random_record(random.Random(3), 0, today), "id": ["r0"]}
    write_log_segment(isolated_env, today, 0, [damaged])
    ws = await connect(client, token)
    await chat(ws, "hello")
    await chat(ws, "again", "r2")
    await ws.close()
    report = await (await client.get("/api/usage", headers=auth_headers)).json()
    assert report["grandTotal"]["requestCount"] == 2
    [aside] = report["damagedFiles"]
    assert Path(aside).name.startswith("00000.jsonl.damaged-")
    assert json.loads(run("usage", "--json").stdout)["grandTotal"]["requestCount"] == 2


# --- the ledger journal --------------------------------------------------------------------------------------


async def test_a_ledger_journal_whose_last_write_lost_only_its_newline_posts_nothing_for_it(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    # A crash may stop a write anywhere, just before its newline too: what is left of the line then parses. That
    # write was never synced, so its call never left: a pending entry read from it would charge a call never made.
    data_dir = tmp_path / "data"
    journal, lines, pending = await journal_of_a_killed_call(data_dir, fake_anthropic)
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


def edit_client(data_dir: Path, key: str, /, **changes: Any) -> None:
    """Change a stored client by hand, as an operator with an editor would (the file stays 0600)."""
    path = data_dir / "clients.json"
    data = json.loads(path.read_text())
    data["clients"][key] = changes.pop("whole") if "whole" in changes else {**data["clients"][key], **changes}
    path.write_text(json.dumps(data))


async def test_a_client_with_limits_of_the_wrong_type_is_refused_and_named_not_a_crash(
    isolated_env: Path, make_client: Any, token: str
) -> None:
    # clients.json edited by hand: a budget written as a string, a period that does not exist. The client's key is
    # refused (as for any client that cannot be read), every other client and every listing go on working, and
    # `agentspace doctor` names it.
    bob = run("clients", "add", "bob", "--budget", "5").stdout.strip()
    alice = run("clients", "add", "alice").stdout.strip()
    carol = run("clients", "add", "carol").stdout.strip()
    edit_client(isolated_env, "bob", budgetUsd="5", period="fortnight")
    edit_client(isolated_env, "carol", lastUsedAt=1765000000)
    listed = run("clients", "list").stdout
    assert "alice" in listed and "bob" not in listed and "carol" not in listed
    doctor = CliRunner().invoke(cli, ["doctor"])
    assert doctor.exit_code == 1 and "client 'bob' cannot be read (its key is refused)" in doctor.output
    assert "client 'carol' cannot be read" in doctor.output

    client: TestClient = await make_client()
    clients = await client.get("/api/clients", headers={"Authorization": f"Bearer {token}"})
    assert clients.status == 200 and [c["name"] for c in (await clients.json())["clients"]] == ["alice"]
    for refused in (bob, carol):
        assert (await client.get("/api/usage", headers={"Authorization": f"Bearer {refused}"})).status == 401
    assert (await client.get("/api/usage", headers={"Authorization": f"Bearer {alice}"})).status == 200


def test_a_client_whose_name_inside_was_edited_is_the_client_its_key_in_the_table_names(isolated_env: Path) -> None:
    # Every change finds a client by its key in the table: a name edited inside its document must not make a
    # client that is listed under one name and changed (silently, not at all) or removed (a traceback) by it.
    run("clients", "add", "bob")
    edit_client(isolated_env, "bob", name="robert")
    assert run("clients", "list").stdout.splitlines()[2].split()[0] == "bob"
    run("clients", "set", "bob", "--budget", "3")
    stored = json.loads((isolated_env / "clients.json").read_text())["clients"]
    assert list(stored) == ["bob"] and stored["bob"]["budgetUsd"] == 3 and stored["bob"]["name"] == "bob"
    assert "robert" not in run("clients", "list").stdout
    run("clients", "remove", "bob")
    assert json.loads((isolated_env / "clients.json").read_text())["clients"] == {}


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


# --- sessions ------------------------------------------------------------------------------------------------


async def listed_ids(client: TestClient, headers: dict[str, str]) -> list[str]:
    resp = await client.get("/api/sessions", headers=headers)
    assert resp.status == 200, await resp.text()
    return sorted(s["id"] for s in (await resp.json())["sessions"])


async def test_a_session_journal_damaged_before_a_create_still_serves_that_session(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    # A session that exists only in the journal (the server was killed during its first turn, after it was
    # acknowledged) and a line damaged from outside before its create: every mark of that create follows it, so it
    # is read whole and served. A create before the damage may have lost its mark (filed and deleted since) and is
    # not brought back; both stay in the journal kept aside.
    data_dir = tmp_path / "data"
    session_id = await killed_during_a_first_turn(data_dir, fake_anthropic, "after the damage")
    path = data_dir / "sessions" / JOURNAL_NAME
    journal = path.read_bytes()
    [create] = [line for line in journal.splitlines(keepends=True) if line.startswith(b'{"create"')]
    damaged = create.replace(session_id.encode(), b"s_before_the_damage") + GARBAGE + journal
    path.write_bytes(damaged)

    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(f"{restarted.url}/api/sessions/{session_id}") as resp:
                assert resp.status == 200, await resp.text()
                messages = (await resp.json())["session"]["messages"]
            async with http.get(f"{restarted.url}/api/sessions/s_before_the_damage") as resp:
                assert resp.status == 404
            async with http.get(f"{restarted.url}/api/sessions") as resp:
                listing = await resp.json()
    finally:
        await restarted.aclose()
    assert [m["content"] for m in messages] == ["after the damage"]
    assert [s["id"] for s in listing["sessions"]] == [session_id]
    [aside] = listing["damagedFiles"]
    assert Path(aside).name.startswith(f"{JOURNAL_NAME}.damaged-") and Path(aside).read_bytes() == damaged


async def test_a_session_file_copied_under_another_id_is_that_session_everywhere(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path, fake_anthropic: Any
) -> None:
    # An operator keeps a conversation by copying its file under another id while the server runs. Every listing
    # shows the id each file has, each opens and deletes by that id, and a chat in the copy goes on in the copy.
    ws = await connect(client, token)
    original = (await chat(ws, "first question"))[0]["sessionId"]
    folder = isolated_env / "sessions"
    copy = "sess_copy01"
    (folder / f"{copy}.jsonl").write_bytes((folder / f"{original}.jsonl").read_bytes())
    assert await listed_ids(client, auth_headers) == sorted([original, copy])
    assert json.loads(run("sessions", "show", copy, "--json").stdout)["id"] == copy
    assert sorted(line.split()[0] for line in run("sessions", "list").stdout.splitlines()[2:]) == sorted(
        [original, copy]
    )

    run("sessions", "delete", original, "--yes")
    assert await listed_ids(client, auth_headers) == [copy]
    assert run("sessions", "list").stdout.splitlines()[2].split()[0] == copy
    await chat(ws, "second question", "r2", sessionId=copy)
    assert sent_texts(fake_anthropic) == ["first question", fa.DEFAULT_TEXT, "second question"]
    resp = await client.get(f"/api/sessions/{copy}", headers=auth_headers)
    assert (await resp.json())["session"]["id"] == copy
    assert await shown(client, auth_headers, copy) == [
        "first question",
        fa.DEFAULT_TEXT,
        "second question",
        fa.DEFAULT_TEXT,
    ]
    assert await listed_ids(client, auth_headers) == [copy]
    run("sessions", "delete", copy, "--yes")
    assert await listed_ids(client, auth_headers) == [] and run("sessions", "list").stdout.startswith("No sessions")
    await ws.close()


async def test_a_session_summary_of_the_wrong_type_is_named_damaged_not_a_listing_that_fails(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    # A summary that JSON allows but no writer makes (a time written as a number, edited or damaged from outside)
    # must not stop every listing that sorts or prints it: that session is named damaged, the others are listed.
    ws = await connect(client, token)
    good = (await chat(ws, "good"))[0]["sessionId"]
    bad = (await chat(ws, "bad", "r2"))[0]["sessionId"]
    await ws.close()
    path = isolated_env / "sessions" / f"{bad}.jsonl"
    *lines, last = path.read_bytes().splitlines(keepends=True)
    summary = json.loads(last)
    summary["session"]["lastActivityAt"] = 1765000000
    path.write_bytes(b"".join(lines) + json.dumps(summary).encode() + b"\n")

    listed = run("sessions", "list")
    assert listed.stdout.splitlines()[2].split()[0] == good and bad not in listed.stdout and str(path) in listed.output
    doctor = CliRunner().invoke(cli, ["doctor"])
    assert doctor.exit_code == 1 and f"{path}: damaged session file" in doctor.output
    resp = await client.get("/api/sessions", headers=auth_headers)
    assert resp.status == 200, await resp.text()
    listing = await resp.json()
    assert [s["id"] for s in listing["sessions"]] == [good] and listing["damagedFiles"] == [str(path)]
    # The server moves it aside at its first read, and says why.
    resp = await client.get(f"/api/sessions/{bad}", headers=auth_headers)
    assert resp.status != 200 and "SESSION_DAMAGED" in await resp.text()
    assert not path.exists() and list(path.parent.glob(f"{bad}.jsonl.damaged-*"))


# --- PostgreSQL rollups --------------------------------------------------------------------------------------


def test_a_record_held_twice_is_migrated_once_and_rolled_up_once(isolated_env: Path, pg_dsn: str) -> None:
    # A data directory can hold a record twice (the same segment copied back by hand, a write retried after
    # its segment rolled over). Migrated, the database stores it once; its rollups must count it once too, or
    # every report says more than the records do.
    records = seed(isolated_env, random.Random(8))[:40]  # 2026-03-01/00000: one segment
    day = isolated_env / "usage" / "2026-03-01"
    source = sorted(day.iterdir())[0]
    (day / f"00009{source.suffix}").write_bytes(source.read_bytes())  # the same records again, in one segment
    result = run("storage", "migrate", "--to", pg_dsn)
    assert "usage records: 480 copied, 40 already there" in result.output, result.output
    config = isolated_env / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\n')
    report = json.loads(run("usage", "--config", str(config), "--json", "--by-day").stdout)
    stored = UsageStore(isolated_env).records_sync()
    once = list({r["id"]: r for r in stored}.values())
    assert len(once) == 480 and len(records) == 40
    assert rounded(report["perDay"]) == rounded(REPORTS["day"](once)["perDay"])
