"""Built-in plugin: budget alerts to a webhook (``[alerts] webhook_url``).

Implements ``budget_threshold``: POSTs one JSON object per alert, with a Slack-style ``text`` line and the
figures (``client``, ``threshold``, ``spendUsd``, ``budgetUsd``, ``period``, ``periodStart``, ``periodEnd``),
tried up to 3 times. Without ``webhook_url`` it does nothing (the alert is still logged).
"""

from __future__ import annotations

import asyncio
import logging

from ..config import Config
from ..hookspecs import hookimpl

log = logging.getLogger(__name__)

ATTEMPTS = 3


@hookimpl
async def budget_threshold(
    client: str,
    threshold: float,
    spend_usd: float,
    budget_usd: float,
    period: str,
    period_start: str | None,
    period_end: str | None,
    config: Config,
) -> None:
    url = config["alerts"]["webhook_url"]
    if not url:
        return
    import aiohttp

    per = "in total" if period == "total" else f"this {period}"
    body = {
        "text": f"agentspace: client {client} has used {threshold:.0%} of its ${budget_usd:g} budget {per} "
        f"(${spend_usd:.4f}).",
        "client": client,
        "threshold": threshold,
        "spendUsd": spend_usd,
        "budgetUsd": budget_usd,
        "period": period,
        "periodStart": period_start,
        "periodEnd": period_end,
    }
    timeout = aiohttp.ClientTimeout(total=float(config["alerts"]["timeout_seconds"]))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with http.post(str(url), json=body) as response:
                    if response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt < ATTEMPTS:
                await asyncio.sleep(attempt)
    log.error("budget alert for client %r not delivered to [alerts] webhook_url: %s", client, problem)
