"""Time periods of usage queries: ``30m``, ``24h``, ``7d``, ``2w`` ago, or a date (CLI ``--since``, REST ``since``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``30m``, ``24h``, ``7d``, ``2w`` (ago), or an ISO date/time (UTC unless it has an offset)."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(value)
    try:
        if m:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r}: use a duration (30m, 24h, 7d, 2w) or a date (2026-11-01)") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        when.astimezone(UTC)  # the stores compare in UTC: a time the years 1-9999 cannot hold there is refused here
        return when
    except OverflowError:  # 999999d, or 0001-01-01T00:00+05:00: before (or after) what a date can be
        raise ValueError(f"{value!r}: out of the range of dates (the years 1 to 9999, UTC)") from None
