"""Model groups tried from outside (audit30t): what a tester coming from LiteLLM's router writes and sees,
through the real CLI and the real HTTP interface against fake upstreams on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agentspace.cli import main
from tests.test_config import fake_server  # noqa: F401

GROUP = """
[models.groups."claude"]
deployments = [
  { model = "anthropic/claude-sonnet-4-5", key = "team-1" },
  { model = "anthropic/claude-sonnet-4-5", key = "team-2" },
]
"""


def test_models_fallbacks_keyed_by_a_group_stop_the_start(
    tmp_path: Path,
    fake_server: list[dict[str, Any]],  # noqa: F811
) -> None:
    """LiteLLM's router takes a group's fallbacks as ``fallbacks: [{"claude": [...]}]``; the same here,
    ``[models] fallbacks = { "claude" = [...] }``, was accepted and never tried (a group goes to its own
    ``fallbacks``): the call failed when every deployment did. serve now stops and says where they go."""
    path = tmp_path / "agentspace.toml"
    path.write_text('[models]\nfallbacks = { "claude" = ["anthropic/claude-haiku-4-5"] }\n' + GROUP)
    result = CliRunner().invoke(main, ["--config", str(path), "serve"])
    assert result.exit_code != 0
    assert f'{path}: models.fallbacks."claude":' in result.output
    assert 'models.groups."claude".fallbacks' in result.output
    assert "Traceback" not in result.output
    assert fake_server == []
