"""Issue 25 (the embedded store at the physical limit) tried from outside again, in new directions: the usage
reports' inputs at the edges of their range, and what a report tells a client about the store's files."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main


@pytest.mark.parametrize("since", ["999999d", "99999999999w", "0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"])
async def test_a_since_out_of_the_range_of_dates_is_refused_by_name(
    client: TestClient, auth_headers: dict[str, str], isolated_env: Path, since: str
) -> None:
    """`since` of the usage reports (`/api/usage`, `agentspace usage --since`) is a duration ago or a date, and
    bad input gets a clear error. A duration reaching before the year 1 (``999999d``, what one might type for
    "all of it") or a date whose UTC time is outside the years 1-9999 made the report raise OverflowError: a
    500 "the gateway failed" from the server, a traceback from the CLI. Both now say what is wrong with it."""
    response = await client.get("/api/usage", params={"since": since}, headers=auth_headers)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "INVALID_MESSAGE" and "since" in error["message"], error
    assert "range of dates" in error["message"], error

    result = CliRunner().invoke(main, ["usage", "--since", since])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--since" in result.output and "range of dates" in result.output, result.output
