"""Budget alerts: a client's spend in its budget period reached a threshold (``[alerts] thresholds``, fractions
of the budget), so the ``budget_threshold`` hook runs, once per client, threshold and period.

``BudgetAlerts`` is a usage sink added after the storage's own: it sees each record once it is written, reads
the client's spend for the period from the usage store's report (its rollups: so every replica's records
count, and the read grows with the period's groups, not its records), and claims each
threshold reached before calling the hook (per budget: a budget changed has its thresholds alerted again, checked
at the change, ``budget_changed``, as well as at each record). The claim is what makes "once" hold: a Redis ``SET NX`` shared
by the replicas when ``[storage] redis_url`` is set, else a small file in the data directory (one process
per data directory then: each alert appends its line to it). The hook runs apart from the turn: a slow webhook delays no answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clients import ADMIN, iso, period_bounds
from .types import UsageRecord

if TYPE_CHECKING:
    import pluggy

    from .cluster import Cluster
    from .config import Config
    from .storage.embedded.append_log import AppendLog
    from .storage.protocols import ClientStoreAPI, UsageStoreAPI

log = logging.getLogger(__name__)

SENT_FILE = "alerts-sent.jsonl"  # in the data directory, without Redis
EARLIER_SENT_FILE = "alerts-sent.json"  # what earlier versions kept: one document, rewritten on every alert
REDIS_PREFIX = "agentspace:alert:"
# Lines of the sent file past twice those live at its last rewrite (plus this) rewrite it without the ended ones.
PRUNE_SLACK = 64


class SentAlerts:
    """Alerts already sent, in a file of the data directory: survives a restart. Each alert appends its line
    ``[key, expires]`` (an ``AppendLog``): an alert writes its own few bytes, not a rewrite of every client's.
    The file is rewritten without the ended periods' alerts once they are most of it (rarely). Used on one
    thread at a time (the lock)."""

    def __init__(self, data_dir: Path) -> None:
        from .storage.embedded.append_log import AppendLog

        self.path = Path(data_dir) / SENT_FILE
        self._lock = threading.Lock()
        self._log: AppendLog = AppendLog(self.path)
        self._sent: dict[str, str | None] = {}
        self._lines = 0  # in the file
        self._kept = 0  # live when it was last read or rewritten

    def claim(self, key: str, expires: datetime | None) -> bool:
        with self._lock:
            if not self._log.is_open:
                self._load()
            if key in self._sent:
                return False
            self._sent[key] = None if expires is None else expires.isoformat()
            if self._lines + 1 > 2 * self._kept + PRUNE_SLACK:
                self._rewrite()
            else:
                self._log.write([[key, self._sent[key]]])
                self._log.sync()
                self._lines += 1
        return True

    def _load(self) -> None:
        from .storage.atomic import StoreCorrupt, move_aside
        from .vault import ensure_private_dir

        ensure_private_dir(self.path.parent)
        try:
            entries = self._log.open()
        except StoreCorrupt as damage:  # not ours (a hand edit, a disk error): kept aside, begun anew
            move_aside(damage)
            entries = self._log.open()
        self._sent = {e[0]: e[1] for e in entries if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)}
        self._lines = len(entries)
        earlier = self.path.with_name(EARLIER_SENT_FILE)
        try:
            self._sent = {**dict(json.loads(earlier.read_text(encoding="utf-8"))), **self._sent}
        except (OSError, ValueError, TypeError):
            pass
        else:  # written once into the log, then gone
            self._rewrite()
            earlier.unlink(missing_ok=True)
        self._kept = len(self._sent)

    def _rewrite(self) -> None:
        """The file anew (whole, atomically) with the alerts of the periods not ended."""
        from .storage.embedded.append_log import AppendLog, encode_lines

        now = datetime.now(UTC)
        self._sent = {k: v for k, v in self._sent.items() if v is None or datetime.fromisoformat(v) > now}
        self._log.close()
        self._log = AppendLog.create(self.path, encode_lines([k, v] for k, v in self._sent.items()))
        self._log.sync()
        self._lines = self._kept = len(self._sent)


class BudgetAlerts:
    name = "budget-alerts"

    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        clients: ClientStoreAPI,
        usage: UsageStoreAPI,
        cluster: Cluster | None,
    ) -> None:
        self.config, self.pm, self.clients, self.usage, self.cluster = config, pm, clients, usage, cluster
        self.thresholds = sorted({float(t) for t in config["alerts"]["thresholds"]})
        self._file: SentAlerts | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, record: UsageRecord) -> None:
        # Never fails the turn: the record is stored already, and an alert is not worth an error.
        try:
            await self._check(record)
        except Exception:  # noqa: BLE001
            log.exception("budget alerts: could not check the spend of client %r", record.client)

    async def budget_changed(self, name: str) -> None:
        """A client's budget or period was changed (``PATCH /api/clients/{name}``): a spend already past a
        threshold of the new budget alerts now, not at the client's next record."""
        try:
            await self._check_client(name)
        except Exception:  # noqa: BLE001 - the change is made; an alert is not worth an error
            log.exception("budget alerts: could not check the spend of client %r", name)

    async def _check(self, record: UsageRecord) -> None:
        if record.client and record.cost.total_cost > 0:
            await self._check_client(record.client)

    async def _check_client(self, name: str) -> None:
        if not self.thresholds or not name or name == ADMIN:
            return
        client = await self.clients.get(name)
        if client is None or not client.budget_usd or client.budget_usd <= 0:
            return
        budget = float(client.budget_usd)
        start, end = period_bounds(client.period, datetime.now(UTC))
        # This client's spend only: not an earlier client's of the same name (as the budget counts it).
        since = client.since if start is None else max(start, client.since or start)
        # From the rollups, off the store thread: the record is in it (the store of record took it before any
        # other sink sees it; one the store refused, kept for a retry, is counted by the next record's check).
        report = await self.usage.report(since=since, client=client.name)
        spend = float(report["grandTotal"]["totalCost"])
        for threshold in self.thresholds:
            if spend + 1e-12 < threshold * budget:
                break
            # Once per budget too: an admin who raises or lowers it hears of its thresholds again, and a client
            # added again under a removed one's name has alerts of its own.
            key = f"{client.name}|{client.period}|{iso(start) or 'total'}|{threshold:g}|{budget!r}|{client.created_at}"
            if await self._claim(key, end):
                self._notify(client.name, threshold, spend, budget, client.period, start, end)

    async def _claim(self, key: str, end: datetime | None) -> bool:
        expires = None if end is None else end + timedelta(days=1)
        cluster = self.cluster
        if cluster is not None:
            ttl = None if expires is None else max(60, int((expires - datetime.now(UTC)).total_seconds()))
            return bool(await cluster.redis.set(REDIS_PREFIX + key, "1", nx=True, ex=ttl))
        if self._file is None:
            self._file = SentAlerts(self.config.data_dir)
        return await asyncio.to_thread(self._file.claim, key, expires)

    def _notify(
        self,
        client: str,
        threshold: float,
        spend: float,
        budget: float,
        period: str,
        start: datetime | None,
        end: datetime | None,
    ) -> None:
        log.warning(
            "client %r has used %.0f%% of its $%g %s budget ($%.4f)", client, threshold * 100, budget, period, spend
        )
        results = self.pm.hook.budget_threshold(
            client=client,
            threshold=threshold,
            spend_usd=round(spend, 10),
            budget_usd=budget,
            period=period,
            period_start=iso(start),
            period_end=iso(end),
            config=self.config,
        )
        for result in results:
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                task = asyncio.ensure_future(self._run(result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(awaitable: Any) -> None:
        try:
            await awaitable
        except Exception:  # noqa: BLE001 - a plugin's failure is logged, never the gateway's
            log.exception("budget_threshold hook failed")
