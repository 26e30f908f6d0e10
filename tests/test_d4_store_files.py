"""The embedded store's files from outside: usage history over a month read by a served gateway and the CLI
while the server writes, rollups of closed segments against files changed in place, and the files a crash
or a hand leaves torn or damaged (a closed usage segment, a rollup file), named by the reports and by
``agentspace doctor``.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result

from agentspace.cli import main
from agentspace.storage.embedded.usage import write_log_segment
from agentspace.storage.reports import REPORTS
from agentspace.types import Cost, TokenUsage, UsageRecord
from scripts.harness import GatewayProcess
from tests.support.ws import chat, connect

MODELS = ["anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5", "openai/gpt-4o", "gemini/gemini-2.5-pro"]


def cli(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(data_dir), *args])


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def record(n: int, when: datetime, rng: random.Random) -> dict[str, Any]:
    return UsageRecord(
        f"seed-{n}",
        iso(when),
        rng.choice(MODELS),
        "anthropic",
        rng.choice([None, "s1", "s2", "s3"]),
        rng.choice([None, "ann", "bob"]),
        TokenUsage(rng.randint(0, 9999), rng.randint(0, 999)),
        Cost(rng.randint(0, 99999) / 1e6, rng.randint(0, 99999) / 1e6),
        1.0,
        rng.choice(["stop", "stop", "length"]),
        endpoint=rng.choice(["ws", "http", "anthropic", "openai"]),
    ).to_dict()


def seed_month(data: Path, rng: random.Random, per_segment: int = 300) -> datetime:
    """Thirty past days of records, two segments a day, some made just before a midnight and stored in the
    next day's folder (appended just after it); the first day is the last of the previous month when today
    is early in one. Returns the first day."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=30)
    n = 0
    for d in range(30):
        day = first + timedelta(days=d)
        for number in range(2):
            batch = []
            for _ in range(per_segment):
                when = day + timedelta(seconds=rng.randint(0, 86399), milliseconds=rng.randint(0, 999))
                if d and rng.random() < 0.02:
                    when = day - timedelta(milliseconds=rng.randint(1, 500))  # the day before, just
                batch.append(record(n, when, rng))
                n += 1
            write_log_segment(data, f"{day:%Y-%m-%d}", number, batch)
    return first


def scan(data: Path, since: str | None = None, skip: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Every record of the segment files, read here line by line (no store code)."""
    records = []
    for path in sorted((data / "usage").glob("*/*.jsonl")):
        if path in skip:
            continue
        records += [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [r for r in records if since is None or r["timestamp"] >= since]


def rounded(value: Any) -> Any:
    return json.loads(json.dumps(value), parse_float=lambda x: round(float(x), 9))


def overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    """Bytes of a file changed where they are (the size kept), as a disk error or an editor does."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def test_a_month_of_usage_read_by_the_cli_and_the_server_while_it_writes_and_segments_changed_in_place(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """``agentspace usage --by-model`` over thirty days (a month's end among them when today is early in one)
    gives what ``/api/usage?by=model`` gives and what the records sum to, while the server writes; the rollups
    the first report wrote are not trusted once a closed segment was changed in place (its size kept): a line
    damaged there is named by the reports and by ``doctor`` and not counted, a value edited there is counted
    as it now reads."""
    data = tmp_path / "data"
    rng = random.Random(25)
    first = seed_month(data, rng)
    gateway = GatewayProcess(data, fake_anthropic.url)
    await gateway.start()
    admin = {"Authorization": f"Bearer {gateway.token}"}
    body = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as session:

            async def api(by: str, since: str | None = None) -> dict[str, Any]:
                query = f"by={by}" + (f"&since={since}" if since else "")
                async with session.get(f"{gateway.url}/api/usage?{query}", headers=admin) as resp:
                    assert resp.status == 200
                    return dict(await resp.json())

            async def calls(n: int) -> None:
                for _ in range(n):
                    async with session.post(gateway.url + "/v1/messages", json=body, headers=admin) as resp:
                        assert resp.status == 200, await resp.text()

            # The CLI reads cold while the server appends (the first report writes the rollups).
            writing = asyncio.create_task(calls(12))
            while not writing.done():
                result = await asyncio.to_thread(cli, data, "usage", "--json", "--by-model")
                assert result.exit_code == 0, result.output
                assert json.loads(result.stdout)["grandTotal"]["requestCount"] >= 30 * 600
            await writing
            await asyncio.sleep(0.2)

            def expected(since: str | None = None, skip: tuple[Path, ...] = ()) -> dict[str, Any]:
                return {**REPORTS["model"](scan(data, since, skip)), "damagedFiles": [str(p) for p in skip]}

            cut = iso(first + timedelta(days=11, hours=13, minutes=7))  # inside a closed day and its rollups
            for since in (None, iso(first + timedelta(days=3)), cut):
                cli_args = ("--since", since) if since else ()
                from_cli = json.loads(cli(data, "usage", "--json", "--by-model", *cli_args).stdout)
                from_api = await api("model", since)
                assert (
                    rounded(from_cli["perModel"])
                    == rounded(from_api["perModel"])
                    == rounded(expected(since)["perModel"])
                )
                assert rounded(from_cli["grandTotal"]) == rounded(from_api["grandTotal"])
                assert from_api["grandTotal"]["requestCount"] == len(scan(data, since))

            # Segments of past days changed in place, their sizes kept: a line damaged in one, a token count
            # edited in another.
            damaged_day = data / "usage" / f"{first + timedelta(days=5):%Y-%m-%d}" / "00001.jsonl"
            raw = damaged_day.read_bytes()
            second_line = raw.index(b"\n") + 1
            overwrite_in_place(damaged_day, second_line, b"\x00" * 40)
            edited = data / "usage" / f"{first + timedelta(days=9):%Y-%m-%d}" / "00000.jsonl"
            raw = edited.read_bytes()
            at = raw.index(b'"inputTokens":') + len(b'"inputTokens":')
            digits = raw[at : at + 1]
            overwrite_in_place(edited, at, b"9" if digits != b"9" else b"8")
            assert edited.stat().st_size == len(raw)

            want = expected(skip=(damaged_day,))
            from_cli = json.loads(cli(data, "usage", "--json", "--by-model").stdout)
            assert from_cli["damagedFiles"] == [str(damaged_day)]
            assert rounded(from_cli["perModel"]) == rounded(want["perModel"])
            from_api = await api("model")
            assert from_api["damagedFiles"] == [str(damaged_day)]
            assert rounded(from_api["grandTotal"]) == rounded(want["grandTotal"])
            by_day = await api("day")  # the day's merged rollup is not trusted either
            assert by_day["damagedFiles"] == [str(damaged_day)]
            assert rounded(by_day["perDay"]) == rounded(REPORTS["day"](scan(data, skip=(damaged_day,)))["perDay"])
            doctor = cli(data, "doctor")
            assert doctor.exit_code == 1
            assert f"{damaged_day}: damaged usage segment" in doctor.output
    finally:
        await gateway.aclose()


async def test_a_damaged_rollup_file_and_a_closed_segments_torn_tail_are_reported_never_counted(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """A rollup file cut short (they are written whole: damage from outside) is moved aside, logged by the
    server and named by ``doctor``, and the report is rebuilt from the segments; a past day's segment ending in
    part of a line (a crash before midnight, the server restarted after it) is counted without that part, with
    a warning in the server's log, once."""
    data = tmp_path / "data"
    rng = random.Random(4)
    first = seed_month(data, rng, per_segment=40)
    day = f"{first + timedelta(days=2):%Y-%m-%d}"
    torn = data / "usage" / day / "00001.jsonl"
    half_a_record = json.dumps(record(99_999, first + timedelta(days=2, hours=23), rng)).encode()[:70]
    with open(torn, "ab") as f:
        f.write(half_a_record)
    expected = REPORTS["model"](scan_complete(data))
    gateway = GatewayProcess(data, fake_anthropic.url)
    await gateway.start()
    admin = {"Authorization": f"Bearer {gateway.token}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def report(by: str) -> dict[str, Any]:
                async with session.get(f"{gateway.url}/api/usage?by={by}", headers=admin) as resp:
                    assert resp.status == 200
                    return dict(await resp.json())

            assert rounded(await report("model")) == rounded({**expected, "damagedFiles": []})
            assert rounded(await report("model")) == rounded({**expected, "damagedFiles": []})
            warned = [line for line in gateway.log().splitlines() if str(torn) in line]
            assert len(warned) == 1 and "never acknowledged" in warned[0], warned
            assert cli(data, "doctor").exit_code == 0

            rollup = data / "usage" / "rollups" / f"{day}.json"
            whole = data / "usage" / "rollups" / f"{day}.day.json"
            bare = data / "usage" / "rollups" / f"{day}.nosession.json"  # the day merged without sessions
            for path in (rollup, whole, bare):
                path.write_bytes(path.read_bytes()[:-9])
            doctor = cli(data, "doctor")
            assert doctor.exit_code == 1
            assert f"{rollup}: damaged usage rollup" in doctor.output
            assert f"{whole}: damaged usage rollup" in doctor.output
            assert f"{bare}: damaged usage rollup" in doctor.output

            assert rounded(await report("model")) == rounded({**expected, "damagedFiles": []})
            aside = sorted(p.name for p in rollup.parent.iterdir() if ".damaged-" in p.name)
            assert [name.split(".damaged-")[0] for name in aside] == [whole.name, rollup.name, bare.name]
            assert json.loads(rollup.read_bytes()) and json.loads(whole.read_bytes()) and json.loads(bare.read_bytes())
            assert sum(f"moved aside to {rollup.parent}" in line for line in gateway.log().splitlines()) == 3
            doctor = cli(data, "doctor")
            assert doctor.exit_code == 1
            assert sum("damaged usage rollup (kept for inspection" in line for line in doctor.output.splitlines()) == 3
            cli_report = json.loads(cli(data, "usage", "--json", "--by-model").stdout)
            assert rounded(cli_report["grandTotal"]) == rounded(expected["grandTotal"])

            # Rollups that parse but whose groups are not rollups' (edited): moved aside too, the report whole.
            other = f"{first + timedelta(days=7):%Y-%m-%d}"
            edited = data / "usage" / "rollups" / f"{other}.day.json"
            merged = json.loads(edited.read_bytes())
            merged["day"]["merged"]["groups"][0][6] = "many"
            edited.write_text(json.dumps(merged), encoding="utf-8")
            segments = data / "usage" / "rollups" / f"{other}.json"
            table = json.loads(segments.read_bytes())
            next(iter(table["segments"].values()))["groups"] = [[None]]
            segments.write_text(json.dumps(table), encoding="utf-8")
            edited_bare = data / "usage" / "rollups" / f"{other}.nosession.json"
            merged = json.loads(edited_bare.read_bytes())
            merged["day"]["merged"]["groups"][0][6] = "many"
            edited_bare.write_text(json.dumps(merged), encoding="utf-8")
            for _ in range(2):
                assert rounded(await report("model")) == rounded({**expected, "damagedFiles": []})
            cli_report = json.loads(cli(data, "usage", "--json", "--by-model", "--by-day").stdout)
            assert rounded(cli_report["perDay"]) == rounded(REPORTS["day"](scan_complete(data))["perDay"])
            aside = sorted(p.name.split(".damaged-")[0] for p in rollup.parent.iterdir() if ".damaged-" in p.name)
            assert aside == sorted([whole.name, rollup.name, bare.name, edited.name, segments.name, edited_bare.name])
            assert sum("not a usage rollup" in line for line in gateway.log().splitlines()) == 3
    finally:
        await gateway.aclose()


def scan_complete(data: Path) -> list[dict[str, Any]]:
    """The records of the segments' complete lines (a torn last line is not one)."""
    records = []
    for path in sorted((data / "usage").glob("*/*.jsonl")):
        raw = path.read_bytes()
        records += [json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].splitlines() if line.strip()]
    return records


async def test_usage_files_deleted_or_moved_away_while_the_server_writes_lose_no_later_record(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """Usage history pruned or archived from outside while the server runs (today's segment deleted, then
    today's whole folder moved away): every later call's record is in a file the reports read, not appended
    to a file no name leads to."""
    data = tmp_path / "data"
    gateway = GatewayProcess(data, fake_anthropic.url)
    await gateway.start()
    admin = {"Authorization": f"Bearer {gateway.token}"}
    body = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as session:

            async def calls(n: int) -> None:
                for _ in range(n):
                    async with session.post(gateway.url + "/v1/messages", json=body, headers=admin) as resp:
                        assert resp.status == 200, await resp.text()

            async def requests() -> int:
                async with session.get(gateway.url + "/api/usage?by=model", headers=admin) as resp:
                    return int((await resp.json())["grandTotal"]["requestCount"])

            await calls(2)
            [segment] = (data / "usage").glob("*/*.jsonl")
            segment.unlink()
            await calls(3)
            assert await requests() == 3 == len(scan(data))
            archive = tmp_path / "archive"
            segment.parent.rename(archive)
            await calls(2)
            assert await requests() == 2 == len(scan(data))
            archived = [line for path in archive.glob("*.jsonl") for line in path.read_bytes().splitlines()]
            assert len(archived) == 3  # the records written before it was moved, where they were
            moved = [line for line in gateway.log().splitlines() if "moved or replaced from outside" in line]
            assert len(moved) == 2, moved
            assert cli(data, "doctor").exit_code == 0
    finally:
        await gateway.aclose()
    assert not gateway.log_problems()


async def test_the_sessions_folder_removed_while_the_server_runs_takes_new_sessions_at_once(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """History cleared from outside (the sessions folder removed) while the server has sessions cached: the
    old ones are gone for every reader, and the next chat starts a session as on a fresh data directory, not
    a storage error until a restart."""
    ws = await connect(client, token)
    old = (await chat(ws, "first question"))[0]["sessionId"]
    assert (await client.get(f"/api/sessions/{old}", headers=auth_headers)).status == 200
    shutil.rmtree(isolated_env / "sessions")

    assert (await client.get(f"/api/sessions/{old}", headers=auth_headers)).status == 404
    frames = await chat(ws, "a new start", "r2")
    assert frames[-1]["type"] == "chat.stream.end", frames
    new = frames[0]["sessionId"]
    assert new != old
    resp = await client.get(f"/api/sessions/{new}", headers=auth_headers)
    assert [m["content"] for m in (await resp.json())["session"]["messages"]][0] == "a new start"
    listed = json.loads(cli(isolated_env, "sessions", "list", "--json").stdout)
    assert [s["id"] for s in listed] == [new]
    await chat(ws, "and again", "r3", sessionId=new)  # its next turn is appended where its file now is
    assert json.loads(cli(isolated_env, "sessions", "show", new, "--json").stdout)["messageCount"] == 4
    await ws.close()


async def test_a_clients_file_of_another_shape_put_in_place_while_the_server_runs_is_set_aside(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """JSON that is not the clients table (a list, null, a table that is a list) written over clients.json
    while the server serves client keys: the keys are refused (401, not a 500 at every request), the file is
    moved aside and logged, ``doctor`` names the copy, and the CLI adds clients again."""
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    await gateway.start()
    data = gateway.data_dir
    clients_file = data / "clients.json"
    try:
        async with aiohttp.ClientSession() as session:

            async def status(key: str) -> int:
                async with session.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    return r.status

            for n, content in enumerate(("[]", '{"clients": ["ann"]}', "null")):
                key = cli(data, "clients", "add", f"ann{n}").stdout.strip()
                assert await status(key) == 200
                # Put in place as soon as the server's write of its last use is (during that write's folder
                # sync): the server must not take this file for its own.
                for _ in range(2000):
                    if json.loads(clients_file.read_bytes())["clients"][f"ann{n}"].get("lastUsedAt"):
                        break
                    await asyncio.sleep(0.001)
                clients_file.write_text(content, encoding="utf-8")
                assert await status(key) == 401
                assert await status(gateway.token) == 200
                aside = sorted(p for p in data.iterdir() if p.name.startswith("clients.json.damaged-"))
                assert len(aside) == n + 1 and aside[-1].read_text(encoding="utf-8") == content
                listed = cli(data, "clients", "list", "--json")
                assert listed.exit_code == 0 and json.loads(listed.stdout)["clients"] == [], listed.output
                doctor = cli(data, "doctor")
                assert f"{aside[-1]}: damaged clients file" in doctor.output
        assert "not a clients table" in gateway.log()
        assert "Traceback" not in gateway.log()
    finally:
        await gateway.aclose()


async def test_json_lines_that_are_not_usage_records_are_damage_for_every_reader_and_the_writer(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    """A segment line that parses but is not a usage record (a count written as text, a model as a list: an
    edit, another program's line) makes its segment damaged for the reports, the CLI and ``doctor`` alike
    (named, not counted; every other segment still counted), not a failure of every report; the server moves
    today's such segment aside before appending to it."""
    data = tmp_path / "data"
    rng = random.Random(9)
    now = datetime.now(UTC)
    today, past = f"{now:%Y-%m-%d}", f"{now - timedelta(days=3):%Y-%m-%d}"
    good = [record(n, now - timedelta(days=3, minutes=n), rng) for n in range(20)]
    write_log_segment(data, past, 0, good)
    write_log_segment(data, past, 1, [*good[:3], {**record(50, now - timedelta(days=3), rng), "model": ["m"]}])
    todays = [record(60 + n, now - timedelta(seconds=n), rng) for n in range(5)]
    write_log_segment(data, today, 0, [*todays, {**record(70, now, rng), "inputTokens": "12"}])
    bad_past, bad_today = data / "usage" / past / "00001.jsonl", data / "usage" / today / "00000.jsonl"
    gateway = GatewayProcess(data, fake_anthropic.url)
    await gateway.start()
    admin = {"Authorization": f"Bearer {gateway.token}"}
    body = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as session:

            async def report() -> dict[str, Any]:
                async with session.get(gateway.url + "/api/usage?by=model", headers=admin) as resp:
                    assert resp.status == 200, await resp.text()
                    return dict(await resp.json())

            first = await report()
            assert first["damagedFiles"] == [str(bad_past), str(bad_today)]
            assert first["grandTotal"]["requestCount"] == len(good)
            from_cli = cli(data, "usage", "--json")
            assert from_cli.exit_code == 0, from_cli.output
            assert json.loads(from_cli.stdout)["grandTotal"] == first["grandTotal"]
            doctor = cli(data, "doctor")
            assert f"{bad_past}: damaged usage segment" in doctor.output
            assert f"{bad_today}: damaged usage segment" in doctor.output
            assert f"usage: {len(good)} records readable, 2 damaged" in doctor.output

            async with session.post(gateway.url + "/v1/messages", json=body, headers=admin) as resp:
                assert resp.status == 200, await resp.text()
            [aside] = [p for p in bad_today.parent.iterdir() if ".damaged-" in p.name]
            assert len(bad_today.read_bytes().splitlines()) == 1  # the new record, in a fresh segment
            after = await report()
            assert after["damagedFiles"] == [str(bad_past), str(aside)]
            assert after["grandTotal"]["requestCount"] == len(good) + 1
        assert "Traceback" not in gateway.log()
    finally:
        await gateway.aclose()


def test_rollups_this_reader_cannot_read_are_passed_over_for_the_segments(tmp_path: Path) -> None:
    """Rollups another user made (``sudo agentspace usage`` beside the server's user), here files that cannot
    be read as files: the report reads those days' segments instead of failing, and ``doctor`` names them."""
    data = tmp_path / "data"
    first = seed_month(data, random.Random(2), per_segment=20)
    assert cli(data, "usage", "--json").exit_code == 0  # the rollups written
    day = f"{first + timedelta(days=4):%Y-%m-%d}"
    for name in (f"{day}.json", f"{day}.day.json"):
        path = data / "usage" / "rollups" / name
        path.unlink()
        path.mkdir()  # a read fails as it does on another user's 0600 file: with an OSError
    result = cli(data, "usage", "--json", "--by-day")
    assert result.exit_code == 0, result.output
    assert rounded(json.loads(result.stdout)["perDay"]) == rounded(REPORTS["day"](scan(data))["perDay"])
    doctor = cli(data, "doctor")
    assert doctor.exit_code == 1 and f"{data / 'usage' / 'rollups' / (day + '.json')}: cannot be read" in doctor.output


def test_adding_a_client_under_a_name_with_usage_says_so_from_the_rollups(tmp_path: Path) -> None:
    """``clients add`` notes a name that has usage already (a removed client's), read from the reports' groups:
    in a past day's rollup, and in today's open segment."""
    data = tmp_path / "data"
    rng = random.Random(5)
    now = datetime.now(UTC)
    old = [{**record(n, now - timedelta(days=2, minutes=n), rng), "client": "gone"} for n in range(5)]
    write_log_segment(data, f"{now - timedelta(days=2):%Y-%m-%d}", 0, old)
    write_log_segment(data, f"{now:%Y-%m-%d}", 0, [{**record(9, now, rng), "client": "today"}])
    assert cli(data, "usage", "--json").exit_code == 0  # the past day's rollups written
    for name, noted in (("gone", True), ("today", True), ("fresh", False)):
        result = cli(data, "clients", "add", name)
        assert result.exit_code == 0, result.output
        assert (f"A removed client was called {name!r} before" in result.stderr) is noted, name
