"""What the last closing note noticed and left alone, second round (docs/clients.md, docs/protocol.md, ...),
tried from outside: through the CLI, the HTTP routes and the WebSocket of the running app."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from agentspace.cli import main as cli


def test_a_budget_of_minus_zero_is_shown_as_zero(isolated_env: Path) -> None:
    """``clients add --budget -0`` was stored as -0.0 and printed ``$-0.000000`` in every listing."""
    runner = CliRunner()
    added = runner.invoke(cli, ["clients", "add", "ann", "--budget", "-0"])
    assert added.exit_code == 0, added.output
    for args in (["clients", "list"], ["clients", "show", "ann"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "$0.000000 / $0.000000" in result.output and "$-" not in result.output, result.output
    shown = runner.invoke(cli, ["clients", "show", "ann", "--json"])
    assert json.loads(shown.output)["budget"]["usd"] == 0 and "-0.0" not in shown.output, shown.output
