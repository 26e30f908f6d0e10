"""Shared CLI plumbing: the lazily loaded config, the data directory, plain-text tables, and ``printable``,
which every line printing stored data goes through."""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..config import Config, load_config

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliState:
    """Global options. The config is loaded on first use: ``keys path`` need not parse TOML."""

    config_path: str | None = None
    data_dir_override: str | None = None
    _config: Config | None = None
    _said: bool = False  # the data directory was named on stderr

    def config(self) -> Config:
        if self._config is None:
            config = load_config(self.config_path)  # ConfigError is a ClickException: clean message, exit 1
            if self.data_dir_override:
                # --data-dir beats [storage] data_dir and AGENTSPACE_HOME.
                config.values["storage"]["data_dir"] = str(Path(self.data_dir_override).expanduser().resolve())
            self._config = config
        return self._config

    @property
    def data_dir(self) -> Path:
        """The data directory, found as ``serve`` finds it; named on stderr when that is a terminal (a person
        sees which one a command read; a script's output stays as it was)."""
        if not self._said and sys.stderr.isatty():
            self.say_data_dir()
        return self.config().data_dir

    def data_dir_origin(self) -> str:
        """Where ``data_dir`` came from, found as ``agentspace serve`` finds it: --data-dir, then the
        config's ``[storage] data_dir`` (--config or AGENTSPACE_CONFIG), then AGENTSPACE_HOME, then the default."""
        if self.data_dir_override:
            return "--data-dir"
        config = self.config()
        if config["storage"]["data_dir"]:
            return f"[storage] data_dir in {config.source}"
        where = "AGENTSPACE_HOME" if os.environ.get("AGENTSPACE_HOME") else "the default"
        if self.config_path is None:
            return f"{where}; no --config or AGENTSPACE_CONFIG given"
        return f"{where}; {config.source} sets no [storage] data_dir"

    def say_data_dir(self) -> None:
        """Tell (on stderr) which data directory the command uses, so that a token or key is never made in
        another one than the server's without a word. Once per command."""
        if self._said:
            return
        self._said = True
        click.echo(f"agentspace: data directory {self.config().data_dir} ({self.data_dir_origin()})", err=True)


pass_state = click.make_pass_decorator(CliState, ensure=True)


def config_options(f: F) -> F:
    """``--config`` and ``--data-dir`` on a subcommand too (``agentspace serve --config FILE``)."""

    def setter(attribute: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
        def set_value(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
            if value is not None:
                setattr(ctx.ensure_object(CliState), attribute, value)

        return set_value

    # Applied last first, so that --config comes first in the help.
    for flag, kind, attribute, help_text in (
        (
            "--data-dir",
            click.Path(file_okay=False),
            "data_dir_override",
            "Data directory (vault, token, stores); overrides [storage] data_dir and AGENTSPACE_HOME.",
        ),
        ("--config", click.Path(dir_okay=False), "config_path", "Config file (TOML)."),
    ):
        f = click.option(flag, type=kind, expose_value=False, callback=setter(attribute), help=help_text)(f)
    return f


def command_config() -> Config:
    """The configuration of the running ``agentspace`` command, for a plugin's command: found as ``serve``
    finds it (``--data-dir``, then ``--config`` or AGENTSPACE_CONFIG, then AGENTSPACE_HOME), and the data
    directory named on stderr when that is a terminal, as the built-in commands do. ``load_config(None)``
    would ignore AGENTSPACE_CONFIG and read another data directory than the server's."""
    ctx = click.get_current_context(silent=True)
    state = ctx.find_object(CliState) if ctx is not None else None
    if state is None:  # called outside the command line (a plugin's own tests)
        return load_config(os.environ.get("AGENTSPACE_CONFIG") or None)
    if sys.stderr.isatty():
        state.say_data_dir()
    return state.config()


# What must not reach a terminal raw from stored data (model ids, titles, names, message text): C0 controls
# (ESC starts colour codes and title-setting OSC sequences, a newline forges a table row), DEL, C1 controls
# (0x9b is a one-byte CSI), and the Unicode line separators and bidirectional overrides that reorder text.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _escape_keeping_lines(match: re.Match[str]) -> str:
    return match.group() if match.group() in "\n\t" else _escape(match)


def printable(value: Any, *, lines: bool = False) -> str:
    """``value`` as text safe to print: every control character shown as an escape (``\\x1b``, ``\\n``).
    ``lines=True`` keeps line breaks and tabs (a message's text printed on lines of its own)."""
    text = "" if value is None else str(value)
    return _UNPRINTABLE.sub(_escape_keeping_lines if lines else _escape, text)


def warn_damaged(files: list[str], what: str) -> None:
    """One line on stderr naming the damaged files a command left out (``what``: how many of what, and how)."""
    if files:
        click.echo(
            f"warning: {len(files)} {what} (kept for inspection; see: agentspace doctor): "
            f"{printable(', '.join(files))}",
            err=True,
        )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """An aligned plain-text table; columns listed in ``right`` (numbers) are right-aligned. Every cell goes
    through ``printable``: stored data cannot add rows or send escapes."""
    cells = [[printable(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def wait_note(seconds: Any) -> str:
    """`` (try again in N s)`` for the seconds a refusal said to wait (``retryAfter``, ``Retry-After``), or ''."""
    try:
        wait = float(seconds)
    except (TypeError, ValueError):
        return ""
    return f" (try again in {wait:.0f} s)" if wait > 0 else ""


def money(value: float) -> str:
    """Dollars with 6 decimals below $1 (token costs are tiny), 4 above. A value that rounds to zero is $0.000000,
    never $-0.000000 (a budget stored as -0 before it was normalised, a tiny negative difference)."""
    return f"${value:,.4f}" if abs(value) >= 1 else f"${round(value, 6) + 0.0:.6f}"


def count(value: Any) -> str:
    return f"{int(value or 0):,}"


def new_id() -> str:
    """A request id for the WebSocket protocol (unique per connection is enough)."""
    return uuid.uuid4().hex[:12]
