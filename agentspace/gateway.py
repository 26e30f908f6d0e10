"""The composition root: the gateway of one server process, assembled once at start.

``assemble`` opens nothing itself (the storage is opened and started by the caller) and builds, in order:
what the plugins registered (a frozen ``registry.Plugins``), the Redis connection the replicas share when
``[storage] redis_url`` is set, the counters, route state and session locks (in this process, or in Redis),
the model lookup, the checks before each call (``limits.Guard``), the usage sinks and the ledger. Nothing is
attached to the ``Registry`` afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from types import MappingProxyType

import pluggy

from . import pricing
from .alerts import BudgetAlerts
from .cluster import Cluster, RedisSessionLocks, StreamEncoder
from .config import Config, ConfigError
from .limits import Counters, Guard, InProcessCounters
from .pending import PendingWrites
from .plugins import call_register, check_claims
from .providers.base import Provider
from .recording import Recorder
from .registry import Models, Plugins, Registry
from .routing import LocalRouteState, Router, RouteState
from .session_locks import InProcessLocks, SessionLocks
from .sinks import UsageSink, sink_name
from .storage.embedded.blobs import FileBlobStore
from .storage.embedded.clients import ClientStore
from .storage.ledger import Ledger
from .storage.postgres.usage import PostgresUsageStore
from .storage.protocols import SharedLedger, Storage
from .types import ContextSectionBuilder, Tool

log = logging.getLogger(__name__)


def registered(config: Config, pm: pluggy.PluginManager, storage: Storage) -> Plugins:
    """What the plugins register (providers, context sections, tools, usage sinks), asked once."""
    providers: list[Provider] = []
    sections: list[ContextSectionBuilder] = []
    tools: dict[str, Tool] = {}
    sinks: list[UsageSink] = [storage.sink] if storage.sink is not None else []

    def add_tool(tool: Tool) -> None:
        if tool.name in tools:
            log.warning("tool %r registered twice; the later registration wins", tool.name)
        tools[tool.name] = tool

    call_register(pm, "register_providers", providers.append, config=config)
    call_register(pm, "register_context_sections", sections.append, config=config)
    call_register(pm, "register_tools", add_tool, config=config)

    def add_sink(sink: UsageSink) -> None:
        # A sink's name labels its queue and drop metrics and its log lines: two of one name would mix them.
        name = sink_name(sink)
        same = next((s for s in sinks if sink_name(s) == name), None)
        if same is not None:
            raise ValueError(
                f"usage sink {name!r} ({_class_of(sink)}) has the name of one registered already ({_class_of(same)}), "
                "and their metrics would be one; name them apart"
            )
        sinks.append(sink)

    call_register(pm, "register_usage_sinks", add_sink, config=config)
    check_claims(providers)
    for pattern in pricing.unserved_patterns(config, providers):
        raise ConfigError(
            config.source,
            f'pricing."{pattern}"',
            f"no registered provider serves {pattern.partition('/')[0]!r} models, so the pattern matches "
            "nothing (is the provider plugin installed? agentspace plugins)",
        )
    return Plugins(tuple(providers), tuple(sections), MappingProxyType(tools), tuple(sinks))


def _class_of(thing: object) -> str:
    return f"{type(thing).__module__}.{type(thing).__qualname__}"


async def assemble(
    config: Config,
    pm: pluggy.PluginManager,
    storage: Storage,
    *,
    shutting_down: asyncio.Event | None = None,
    on_credentials_changed: Callable[[], None] | None = None,
    stream_encoder: Callable[[], StreamEncoder] | None = None,
    gateway_token: Callable[[], str] | None = None,
) -> Registry:
    """The gateway over a started ``storage``. ``shutting_down``: once set, no provider call is admitted;
    ``on_credentials_changed``: called when a replica announces a rotated or removed client key;
    ``stream_encoder``: makes the encoder of the streams published for resumes on other replicas (needed
    with ``[storage] redis_url``); ``gateway_token``: the token now, which an admin's call is checked against."""
    plugins = registered(config, pm, storage)
    cluster: Cluster | None = None
    counters: Counters = InProcessCounters()
    redis_counters = None
    route_state: RouteState = LocalRouteState()
    locks: SessionLocks = InProcessLocks()
    if config["storage"]["redis_url"]:
        from .redis_counters import RedisCounters
        from .redis_routing import RedisRouteState

        if stream_encoder is None:
            raise ValueError("[storage] redis_url: the replicas' shared streams need a stream_encoder")
        url = str(config["storage"]["redis_url"])
        lease = float(config["storage"]["lease_seconds"])
        cluster = Cluster(
            url, on_credentials_changed=on_credentials_changed, encoder=stream_encoder, lease_seconds=lease
        )
        counters = redis_counters = RedisCounters(cluster.redis, lease)  # limits and budgets hold across replicas
        route_state = RedisRouteState(cluster.redis)  # one replica's 429 cools a deployment for all
        locks = RedisSessionLocks(cluster)  # a session streams on one replica at a time
    elif storage.shared:
        log.warning(
            "storage %r without [storage] redis_url: run this gateway as ONE replica "
            "(streams, locks and aborts are kept in this process)",
            storage.backend,
        )
    router = Router(config.groups, route_state)
    models = Models(config, plugins.providers, router)
    clients = storage.clients if storage.clients is not None else ClientStore(config.data_dir)
    guard = Guard(
        clients, storage.usage, models.model_info, counters, shutting_down=shutting_down, gateway_token=gateway_token
    )
    if isinstance(storage.usage, PostgresUsageStore):  # a recovered estimate it takes out leaves the spend too
        storage.usage.unsettle = guard.unsettle
    sinks = list(plugins.sinks)
    alerts = BudgetAlerts(config, pm, clients, storage.usage, cluster) if config["alerts"]["thresholds"] else None
    if alerts is not None:  # after the storage's sink: it reads the spend the record just added to
        sinks.append(alerts)
    gw = Registry(
        config=config,
        pm=pm,
        storage=storage,
        sessions=storage.sessions,
        usage=storage.usage,
        clients=clients,
        blobs=storage.blobs if storage.blobs is not None else FileBlobStore(config.data_dir),
        plugins=plugins,
        models=models,
        guard=guard,
        ledger=Ledger(config.data_dir, shared=_shared_ledger(storage, cluster)),
        recorder=Recorder(sinks, pm, guard, PendingWrites()),
        router=router,
        locks=locks,
        cluster=cluster,
        alerts=alerts,
    )
    if cluster is not None:
        await cluster.start(locks)  # Redis answers; aborts for this replica's turns are heard
        log.info("replica %s: streams, locks and aborts shared through Redis", cluster.replica_id)
    if redis_counters is not None:
        await redis_counters.start()
    return gw


def _shared_ledger(storage: Storage, cluster: Cluster | None) -> SharedLedger | None:
    """The pending entries this replica shares with the others (a backend with ``shared_ledger``), under a
    name of its own: the cluster's replica id, or host and process, and a few random bytes (a restarted
    process is another holder of leases)."""
    if storage.shared_ledger is None:
        return None
    replica = cluster.replica_id if cluster is not None else f"{socket.gethostname()}-{os.getpid()}"
    return storage.shared_ledger(f"{replica}-{os.urandom(3).hex()}")
