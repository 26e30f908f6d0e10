"""The built-in metrics plugin: ``GET /metrics`` in the Prometheus text format (README.md#metrics-and-traces).

A plugin like any other (left out when ``AGENTSPACE_LOAD_PLUGINS`` is set and does not name ``metrics``).
The request, error, token and cost counters and the two latency histograms are fed from the usage records:
the plugin is a usage sink, so every provider call on every endpoint is counted exactly as the usage store
counts it (``requests`` = records the upstream answered, ``errors`` = records with an error code). The
observation hooks add what records do not hold: streams in flight, fallbacks, store write latency.

One registry per process: each replica exports its own numbers, and the labels let Prometheus sum them. The
workers of ``serve --workers N`` share one port, so a scrape reaches any one of them: they write their numbers
to files in the directory the supervisor names in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode), and every worker's ``/metrics`` answers the sum of all of them, those of workers that died
included (``process_*`` and ``python_*`` are then left out: they are one process's).
Label values stay few: the model is one the price list or the config knows, else ``other``; the client is
one of the first ``MAX_CLIENTS`` names seen, else ``other``; no session ids, no text.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    multiprocess,
    platform_collector,
    process_collector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agentspace import pricing
from agentspace.config import is_pattern
from agentspace.hookspecs import hookimpl
from agentspace.sink_queue import live_queues

if TYPE_CHECKING:
    from agentspace.config import Config
    from agentspace.observe import CallInfo, TurnInfo
    from agentspace.sinks import UsageSink
    from agentspace.types import UsageRecord

OTHER = "other"
MAX_CLIENTS = 100
# LLM calls take from tens of milliseconds (a cached first token) to minutes (a long answer).
LLM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")

REGISTRY = CollectorRegistry()  # what GET /metrics answers
# A worker of `serve --workers N`: the metrics below go to the shared directory's files (prometheus_client
# chose its file-backed values at import, from the same variable), and a scrape reads every worker's files.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
if MULTIPROCESS:
    multiprocess.MultiProcessCollector(REGISTRY)
    _OWN: CollectorRegistry | None = None  # declared, not scraped: their values are read back from the files
else:
    process_collector.ProcessCollector(registry=REGISTRY)
    platform_collector.PlatformCollector(registry=REGISTRY)
    gc_collector.GCCollector(registry=REGISTRY)
    _OWN = REGISTRY

CALL_LABELS = ("model", "client", "endpoint")
REQUESTS = Counter("agentspace_requests", "Provider calls the upstream answered.", CALL_LABELS, registry=_OWN)
ERRORS = Counter(
    "agentspace_errors",
    "Provider calls that ended in an error, by error code.",
    (*CALL_LABELS, "code"),
    registry=_OWN,
)
TOKENS = Counter(
    "agentspace_tokens",
    "Tokens of provider calls, by kind: input, output, cache_read, cache_write, reasoning.",
    (*CALL_LABELS, "kind"),
    registry=_OWN,
)
COST = Counter("agentspace_cost_usd", "Cost of provider calls in US dollars.", CALL_LABELS, registry=_OWN)
SERVER_TOOLS = Counter(
    "agentspace_server_tool_uses",
    "Server tools the upstream ran and billed per use (web_search, web_fetch, code_execution).",
    (*CALL_LABELS, "tool"),
    registry=_OWN,
)
SERVER_TOOL_COST = Counter(
    "agentspace_server_tool_cost_usd",
    "Fees for server tools in US dollars (part of agentspace_cost_usd).",
    CALL_LABELS,
    registry=_OWN,
)
TTFT = Histogram(
    "agentspace_time_to_first_token_seconds",
    "From the start of a provider call to its first streamed output.",
    ("model", "endpoint"),
    buckets=LLM_BUCKETS,
    registry=_OWN,
)
DURATION = Histogram(
    "agentspace_request_duration_seconds",
    "Duration of provider calls that reached the upstream, retries and fallbacks included.",
    ("model", "endpoint"),
    buckets=LLM_BUCKETS,
    registry=_OWN,
)
STREAMS = Gauge(
    "agentspace_streams_in_flight",
    "Answers being streamed now: chat turns (ws, http) and /v1 calls (anthropic, openai).",
    ("endpoint",),
    registry=_OWN,
    multiprocess_mode="livesum",  # the workers' streams now (a dead worker's file is removed by the supervisor)
)
RETRIES = Counter(
    "agentspace_upstream_retries",
    "Upstream attempts beyond the first (after 429 or 5xx).",
    ("model",),
    registry=_OWN,
)
FALLBACKS = Counter(
    "agentspace_fallbacks",
    "Provider calls answered by a fallback model ([models] fallbacks), by the model requested.",
    ("model", "fallback"),
    registry=_OWN,
)
DEPLOYMENT_CALLS = Counter(
    "agentspace_deployment_calls",
    "Provider calls per deployment of a model group ([models.groups]), answered or failed with an error code.",
    ("deployment", "outcome"),
    registry=_OWN,
)
STORE_WRITES = Histogram(
    "agentspace_store_write_seconds",
    "Store writes the server waited for: sessions, usage:<sink>.",
    ("store",),
    buckets=STORE_BUCKETS,
    registry=_OWN,
)


SINK_FAILURES_HELP = "Calls of a usage sink's record that raised or timed out (each retry counts)."
SINK_DROPPED_HELP = "Usage records a sink never got: refused (DropRecord), its queue full, or left at shutdown."
SINK_DEPTH_HELP = "Usage records waiting for a sink."


def _queue_totals() -> dict[str, tuple[int, int, int]]:
    """The queued usage sinks of this process (``agentspace.sinks.SinkQueue``) by name: failures, dropped,
    depth."""
    totals: dict[str, tuple[int, int, int]] = {}
    for queue in live_queues():
        failed, lost, waiting = totals.get(queue.name, (0, 0, 0))
        totals[queue.name] = (failed + queue.failures, lost + queue.dropped, waiting + queue.depth)
    return dict(sorted(totals.items()))


class SinkQueueCollector:
    """The queues' figures, read at each scrape (one process)."""

    def collect(self) -> Iterator[Metric]:
        failures = CounterMetricFamily("agentspace_sink_failures", SINK_FAILURES_HELP, labels=["sink"])
        dropped = CounterMetricFamily("agentspace_sink_dropped", SINK_DROPPED_HELP, labels=["sink"])
        depth = GaugeMetricFamily("agentspace_sink_queue_depth", SINK_DEPTH_HELP, labels=["sink"])
        for name, (failed, lost, waiting) in _queue_totals().items():
            failures.add_metric([name], failed)
            dropped.add_metric([name], lost)
            depth.add_metric([name], waiting)
        yield from (failures, dropped, depth)


# Workers: the queues' figures go to the shared files, brought up to date at each record and each scrape.
SINK_FAILURES = Counter("agentspace_sink_failures", SINK_FAILURES_HELP, ("sink",), registry=None)
SINK_DROPPED = Counter("agentspace_sink_dropped", SINK_DROPPED_HELP, ("sink",), registry=None)
SINK_DEPTH = Gauge(
    "agentspace_sink_queue_depth", SINK_DEPTH_HELP, ("sink",), registry=None, multiprocess_mode="livesum"
)
_synced: dict[str, tuple[int, int]] = {}  # failures and dropped as last written, by sink


def _sync_queues() -> None:
    if not MULTIPROCESS:
        return
    for name, (failed, lost, waiting) in _queue_totals().items():
        was_failed, was_lost = _synced.get(name, (0, 0))
        if failed > was_failed:
            SINK_FAILURES.labels(name).inc(failed - was_failed)
        if lost > was_lost:
            SINK_DROPPED.labels(name).inc(lost - was_lost)
        SINK_DEPTH.labels(name).set(waiting)
        _synced[name] = (failed, lost)


if not MULTIPROCESS:
    REGISTRY.register(SinkQueueCollector())

# Models any loaded config names (default, fallbacks, prices, provider model lists): known, so labelled.
_configured: set[str] = set()
_labels: dict[str, str] = {}  # model -> its label; bounded: only known models and a capped number of others
_clients: set[str] = set()
_patterns: list[str] = []
_deployments: set[str] = set()  # the configured deployments' ids: the only values of the deployment label


def model_label(model: str) -> str:
    label = _labels.get(model)
    if label is None:
        known = model in _configured or any(fnmatch.fnmatchcase(model, p) for p in _patterns)
        label = model if known or pricing.cost_entry(model) is not None else OTHER
        if len(_labels) < 10_000:
            _labels[model] = label
    return label


def client_label(client: str | None) -> str:
    if client is None:
        return ""
    if client in _clients:
        return client
    if len(_clients) < MAX_CLIENTS and len(client) <= 64:
        _clients.add(client)
        return client
    return OTHER


def _remember_models(config: Config) -> None:
    models = config["models"]
    _configured.add(str(models["default"]))
    for model, chain in models["fallbacks"].items():
        _configured.update([model, *chain])
    _configured.update(m for m in config.pricing if not is_pattern(m))
    _patterns[:] = [m for m in config.pricing if is_pattern(m)]  # [pricing."ollama/*"]: its models are known
    for name, group in config.groups.items():
        _configured.update([name, *group.fallbacks])
        _deployments.update(d.id for d in group.deployments)
    for name, settings in config.providers.items():
        for model in settings["models"]:
            _configured.add(model if "/" in str(model) else f"{name}/{model}")
    _labels.clear()


class MetricsSink:
    """Counts every usage record into the process's Prometheus registry."""

    name = "metrics"
    delivery = "inline"  # counts in memory: called at once, so /metrics is up to date when a turn ends

    async def record(self, record: UsageRecord) -> None:
        model = model_label(record.model)
        endpoint = record.endpoint or ""
        labels = (model, client_label(record.client), endpoint)
        if record.answered is not False:
            REQUESTS.labels(*labels).inc()
        if record.error:
            ERRORS.labels(*labels, record.error).inc()
        if record.deployment is not None:
            deployment = record.deployment if record.deployment in _deployments else OTHER
            outcome = "answered" if record.answered is not False and not record.error else record.error or "error"
            DEPLOYMENT_CALLS.labels(deployment, outcome).inc()
        u = record.usage
        for kind, value in zip(
            TOKEN_KINDS,
            (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens),
            strict=True,
        ):
            if value:
                TOKENS.labels(*labels, kind).inc(value)
        if record.cost.total_cost:
            COST.labels(*labels).inc(record.cost.total_cost)
        for tool, uses in (u.server_tool_use or {}).items():
            if tool in ("web_search", "web_fetch", "code_execution"):  # a bounded label set
                SERVER_TOOLS.labels(*labels, tool).inc(uses)
        if record.cost.server_tool_cost:
            SERVER_TOOL_COST.labels(*labels).inc(record.cost.server_tool_cost)
        if record.attempts > 1:
            RETRIES.labels(model).inc(record.attempts - 1)
        if record.attempts > 0:  # the call reached (or tried to reach) the upstream
            DURATION.labels(model, endpoint).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            TTFT.labels(model, endpoint).observe(record.ttft_ms / 1000)
        _sync_queues()


async def metrics_handler(request: web.Request) -> web.Response:
    _sync_queues()
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


@hookimpl
def register_usage_sinks(register: Callable[[UsageSink], None], config: Config) -> None:
    _remember_models(config)
    register(MetricsSink())


@hookimpl
def register_routes(app: web.Application, config: Config) -> None:
    # The gateway token is checked by the server's middleware, unless [metrics] public = true.
    app.router.add_get("/metrics", metrics_handler)


@hookimpl
def turn_started(turn: TurnInfo) -> None:
    STREAMS.labels(turn.endpoint or "").inc()


@hookimpl
def turn_finished(turn: TurnInfo) -> None:
    STREAMS.labels(turn.endpoint or "").dec()


@hookimpl
def provider_call_started(call: CallInfo) -> None:
    if call.turn is None:  # a /v1 call; a turn's steps are counted with their turn
        STREAMS.labels(call.endpoint or "").inc()


@hookimpl
def provider_call_finished(call: CallInfo, record: UsageRecord) -> None:
    if call.turn is None:
        STREAMS.labels(call.endpoint or "").dec()
    if record.model != call.model and record.deployment is None:  # a group's deployment is no fallback
        FALLBACKS.labels(model_label(call.model), model_label(record.model)).inc()


@hookimpl
def store_written(store: str, seconds: float) -> None:
    STORE_WRITES.labels(store).observe(seconds)
