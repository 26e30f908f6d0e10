"""Clients (README.md#teams-and-budgets): named keys, each with an optional budget, rate limits and model allowlist.

A key is shown once, when it is made or rotated; only its SHA-256 is stored. A key carries 32 random bytes,
so a plain hash is enough (no salt or slow hash: there is nothing to guess from it), and it is compared in
constant time. Budget periods are UTC calendar periods: a day, a week from Monday, a month, or ``total``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

KEY_PREFIX = "as-"
PERIODS = ("day", "week", "month", "total")
ADMIN = "admin"  # the gateway token's caller name; no client may take it
# The client of the usage records written before clients existed, which are the gateway token's
# (``storage.reports.owner``): no client may take these names either (its records would count as the admin's).
LEGACY_ADMIN_NAMES = ("ws", "http")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Limits are finite and in range: a budget or rate past these is a typo, and must still be stored, compared
# and sent as JSON (which has no NaN or infinity).
MAX_BUDGET_USD = 1e9
MAX_RATE = 10**12

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_key() -> str:
    """A client key: the recognisable prefix and 32 random bytes (43 URL-safe characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return "must be 1-64 characters from A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    if name == ADMIN:
        return f"{ADMIN!r} is the gateway token's name"
    if name in LEGACY_ADMIN_NAMES:
        return f"{name!r} names the gateway token's usage from before clients existed"
    return None


def period_bounds(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """The UTC start and end of the budget period containing ``now`` (None, None for ``total``)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    return None, None


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Client:
    """One client as stored: never its key, only the key's hash."""

    name: str
    key_hash: str
    created_at: str
    last_used_at: str | None = None
    budget_usd: float | None = None
    period: str = "month"
    rpm: int | None = None
    tpm: int | None = None
    models: list[str] = field(default_factory=list)  # fnmatch patterns; empty: every model

    @property
    def since(self) -> datetime | None:
        """When this client was made: its identity with its name. A client removed and added again under the
        same name is a new client, and owns nothing from before it (sessions, usage, spend)."""
        try:
            return datetime.fromisoformat(self.created_at) if self.created_at else None
        except ValueError:
            return None

    def owns_since(self, created_at: Any) -> bool:
        """Whether something stamped ``created_at`` (an ISO time) is this client's rather than an earlier
        client's of the same name."""
        return not self.created_at or not isinstance(created_at, str) or created_at >= self.created_at

    def key_matches_hash(self, key_hash: str) -> bool:
        return hmac.compare_digest(self.key_hash, key_hash)

    def model_allowed(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    @property
    def limited(self) -> bool:
        return self.budget_usd is not None or self.rpm is not None or self.tpm is not None

    def to_stored(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "keyHash": self.key_hash,
            "createdAt": self.created_at,
            "lastUsedAt": self.last_used_at,
            "budgetUsd": self.budget_usd,
            "period": self.period,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models),
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> Client:
        """The client as stored. Raises ValueError (KeyError, TypeError) for a stored form no writer of ours makes
        (edited by hand, damaged): its limits are checked as when they are set, or one wrong type would fail every
        listing of the clients, and every call of this one, instead of refusing its key."""
        problems = settings_problems({**data, "period": data.get("period") or "month"})
        if data.get("lastUsedAt") is not None and not isinstance(data["lastUsedAt"], str):
            problems["lastUsedAt"] = "must be a time (ISO 8601) or null"
        if problems:
            raise ValueError(", ".join(f"{name} {problem}" for name, problem in problems.items()))
        return cls(
            name=str(data["name"]),
            key_hash=str(data["keyHash"]),
            created_at=str(data.get("createdAt") or ""),
            last_used_at=data.get("lastUsedAt"),
            budget_usd=data.get("budgetUsd"),
            period=str(data.get("period") or "month"),
            rpm=data.get("rpm"),
            tpm=data.get("tpm"),
            models=list(data.get("models") or []),
        )

    def public(self, spend_usd: float, now: datetime, in_flight_usd: float | None = None) -> dict[str, Any]:
        """What the CLI and ``/api/clients`` show: no key, no hash. ``spend_usd``: the period's spend as posted
        (the same in every view); ``in_flight_usd`` (the server's view): what the calls in flight hold."""
        start, end = period_bounds(self.period, now)
        spend: dict[str, Any] = {"usd": round(spend_usd, 10), "periodStart": iso(start), "periodEnd": iso(end)}
        if in_flight_usd is not None:
            spend["inFlightUsd"] = round(in_flight_usd, 10)
        return {
            "name": self.name,
            "createdAt": self.created_at,
            "lastUsedAt": self.last_used_at,
            "budget": None if self.budget_usd is None else {"usd": self.budget_usd, "period": self.period},
            "spend": spend,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models),
        }


def settings_problems(settings: dict[str, Any]) -> dict[str, str]:
    """What is wrong with the limit settings of a client (``budgetUsd``, ``period``, ``rpm``, ``tpm``, ``models``)."""
    problems: dict[str, str] = {}
    budget = settings.get("budgetUsd")
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, int | float)
        # the range first: NaN compares false with everything (no limit at all), and isfinite cannot take an
        # int past a float's range (10**400 raised OverflowError: a 500)
        or not 0 <= budget <= MAX_BUDGET_USD
        or not math.isfinite(budget)
    ):
        problems["budgetUsd"] = f"must be a number of US dollars from 0 to {MAX_BUDGET_USD:.0e}, or null"
    if "period" in settings and settings["period"] not in PERIODS:
        problems["period"] = "must be one of " + ", ".join(PERIODS)
    for name in ("rpm", "tpm"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RATE):
            problems[name] = f"must be a whole number from 1 to {MAX_RATE:.0e}, or null"
    models = settings.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m.strip() and len(m) <= 200 for m in models)
    ):
        problems["models"] = "must be a list of model id patterns (e.g. anthropic/claude-haiku-*)"
    return problems


def apply_settings(client: Client, settings: dict[str, Any]) -> None:
    if "budgetUsd" in settings:
        # + 0.0: a budget of -0 is 0 (-0.0 + 0.0 is 0.0), not "$-0" in every listing
        client.budget_usd = None if settings["budgetUsd"] is None else float(settings["budgetUsd"]) + 0.0
    if "period" in settings:
        client.period = str(settings["period"])
    for name in ("rpm", "tpm"):
        if name in settings:
            setattr(client, name, settings[name])
    if "models" in settings:
        client.models = [m.strip() for m in settings["models"] or []]
