"""Model groups: one name a client asks for, served by several deployments (docs/routing.md).

A group (``[models.groups."NAME"]``) lists deployments: a provider model id, the vault entry holding its key,
an optional ``base_url``, a weight and optional rpm/tpm limits. Each call to the group picks one deployment
by the group's strategy among those that are not cooling down and have room in their minute; a deployment
that fails before its first byte was relayed (429, 529, 5xx, a timeout, a refused key) is counted, cooled
down past ``allowed_fails`` failures in a minute, and the call moves to the next deployment, then to the
group's fallbacks. Every attempt is its own provider call (``calls.ProviderCall``): its own ledger entry and
usage record, a failed one with ``answered: false``.

The state the choice reads (cooldowns, calls in flight, the deployments' minute windows, latency) is behind
``RouteState``: in this process by default, in Redis (``redis_routing.py``) when ``[storage] redis_url`` is
set, so that one replica's 429 cools the deployment for all of them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .events import ProviderError

if TYPE_CHECKING:
    from .config import Config
    from .providers.base import ProviderRequest
    from .types import ModelInfo

log = logging.getLogger(__name__)

STRATEGIES = ("weighted", "least-busy", "lowest-latency")
WINDOW_SECONDS = 60.0
# The weight of the newest TTFT in a deployment's moving average.
LATENCY_ALPHA = 0.2
# A deployment's TTFT average is forgotten when it was not measured for this long: under lowest-latency it then
# goes first again and is measured anew, so one slow call (a cold connection) does not keep it out for good.
LATENCY_TTL_SECONDS = 60.0
# Errors kept per deployment for the deployments page.
RECENT_ERRORS = 10
# Failures in a minute past which the only deployment of a group without fallbacks is cooled down after all.
# Below it, cooling that deployment would only fail every call at once for the cooldown, with nothing else to take
# them (LiteLLM's router spares such a deployment below the same traffic: SINGLE_DEPLOYMENT_TRAFFIC_FAILURE_THRESHOLD).
LONE_DEPLOYMENT_FAILS = 1000

DEPLOYMENT_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "model": ((str,), None),
    "key": ((str,), None),
    "base_url": ((str,), None),
    "weight": ((int, float), 1),
    "rpm": ((int,), None),
    "tpm": ((int,), None),
    "name": ((str,), None),
}
GROUP_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "deployments": ((list,), None),
    "strategy": ((str,), "weighted"),
    "fallbacks": ((list,), []),
    "allowed_fails": ((int,), 0),
    "cooldown_seconds": ((int, float), 30.0),
}


@dataclass(frozen=True, slots=True)
class Deployment:
    group: str
    name: str  # unique in its group
    model: str  # provider/model, as a provider serves it
    key: str | None  # the vault entry of its API key; None: the provider's own key
    base_url: str | None
    weight: float
    rpm: int | None
    tpm: int | None

    @property
    def id(self) -> str:
        """``group/name``: how records, metrics and the deployments page name it."""
        return f"{self.group}/{self.name}"


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    deployments: tuple[Deployment, ...]
    strategy: str
    fallbacks: tuple[str, ...]
    allowed_fails: int
    cooldown_seconds: float


def parse_groups(
    source: str, table: Any, priced: Sequence[str] = (), fallen_back: Sequence[str] = ()
) -> dict[str, Group]:
    """``[models.groups]`` validated (``priced``: the ``[pricing]`` keys, ``fallen_back``: the ``[models]
    fallbacks`` keys); a ConfigError names the key and what was expected."""
    from .config import ConfigError

    if not isinstance(table, dict):
        raise ConfigError(source, "models.groups", f"expected a table, got {table!r}")
    groups = {name: _parse_group(source, name, raw) for name, raw in table.items()}
    called = {d.model for g in groups.values() for d in g.deployments}
    for group in groups.values():
        if group.name in group.fallbacks:
            raise ConfigError(source, f'models.groups."{group.name}".fallbacks', "a group cannot fall back to itself")
        if group.name in called:  # the name would stand for the group where the deployment means the model
            raise ConfigError(
                source,
                f'models.groups."{group.name}"',
                'a group cannot be named as a model its deployments call; give it a name of its own, e.g. "claude"',
            )
        if group.name in priced:  # a group's calls are priced at the model that answered
            raise ConfigError(
                source,
                f'pricing."{group.name}"',
                "a model group has no price of its own: price the models of its deployments",
            )
        if group.name in fallen_back:  # never read: a group goes on to its own fallbacks (LiteLLM's shape for them)
            raise ConfigError(
                source,
                f'models.fallbacks."{group.name}"',
                f'{group.name!r} is a model group: put its fallbacks in models.groups."{group.name}".fallbacks',
            )
    return groups


def _parse_group(source: str, name: str, raw: Any) -> Group:
    from .config import ConfigError, _check

    where = f'models.groups."{name}"'
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"expected a table, got {raw!r}")
    values = {k: d for k, (_, d) in GROUP_KEYS.items()}
    for key, value in raw.items():
        if key not in GROUP_KEYS:
            raise ConfigError(source, f"{where}.{key}", f"unknown key (known keys: {', '.join(GROUP_KEYS)})")
        values[key] = _check(source, f"{where}.{key}", value, GROUP_KEYS[key][0])
    if not values["deployments"]:
        raise ConfigError(source, f"{where}.deployments", "expected a list of at least one deployment")
    if values["strategy"] not in STRATEGIES:
        raise ConfigError(
            source, f"{where}.strategy", f"expected one of {', '.join(STRATEGIES)}, got {values['strategy']!r}"
        )
    if not all(isinstance(m, str) for m in values["fallbacks"]):
        raise ConfigError(source, f"{where}.fallbacks", "expected a list of model or group names")
    if values["allowed_fails"] < 0:
        raise ConfigError(source, f"{where}.allowed_fails", f"expected 0 or more, got {values['allowed_fails']}")
    if values["cooldown_seconds"] < 0:
        raise ConfigError(source, f"{where}.cooldown_seconds", f"expected 0 or more, got {values['cooldown_seconds']}")
    deployments: list[Deployment] = []
    for i, entry in enumerate(values["deployments"]):
        deployments.append(_parse_deployment(source, name, f"{where}.deployments[{i}]", i, entry, deployments))
    return Group(
        name,
        tuple(deployments),
        values["strategy"],
        tuple(values["fallbacks"]),
        int(values["allowed_fails"]),
        float(values["cooldown_seconds"]),
    )


def _parse_deployment(source: str, group: str, at: str, i: int, entry: Any, before: list[Deployment]) -> Deployment:
    """The ``i``-th deployment of ``group``, named apart from the ones ``before`` it."""
    from .config import ConfigError, _check

    if not isinstance(entry, dict):
        raise ConfigError(source, at, f"expected a table {{model, key, ...}}, got {entry!r}")
    d = {k: default for k, (_, default) in DEPLOYMENT_KEYS.items()}
    for key, value in entry.items():
        if key not in DEPLOYMENT_KEYS:
            raise ConfigError(source, f"{at}.{key}", f"unknown key (known keys: {', '.join(DEPLOYMENT_KEYS)})")
        d[key] = _check(source, f"{at}.{key}", value, DEPLOYMENT_KEYS[key][0])
    model = d["model"]
    if not model or "/" not in model or model.endswith("/"):
        raise ConfigError(source, f"{at}.model", f"expected a provider/model id, got {model!r}")
    if d["weight"] <= 0:
        raise ConfigError(source, f"{at}.weight", f"expected a positive number, got {d['weight']}")
    for limit in ("rpm", "tpm"):
        if d[limit] is not None and d[limit] < 1:
            raise ConfigError(source, f"{at}.{limit}", f"expected a positive integer, got {d[limit]}")
    label = d["name"] or d["key"] or model.split("/", 1)[0]
    if any(x.name == label for x in before):
        if d["name"]:
            raise ConfigError(source, f"{at}.name", f"two deployments are named {label!r}")
        label = f"{label}-{i + 1}"
    return Deployment(group, label, model, d["key"], d["base_url"], float(d["weight"]), d["rpm"], d["tpm"])


# --- state ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Load:
    """What the choice reads of one deployment, now."""

    cooled_until: float = 0.0  # wall-clock seconds; 0: active
    in_flight: int = 0
    requests: int = 0  # in the last minute
    tokens: int = 0  # in the last minute
    latency_ms: float | None = None  # moving average of TTFT
    errors: list[tuple[float, str]] = field(default_factory=list)  # (wall-clock time, code), newest last


class RouteState(Protocol):
    """Where cooldowns, calls in flight and the per-deployment minute windows live."""

    async def loads(self, ids: Sequence[str]) -> list[Load]: ...

    async def take(self, id: str, rpm: int | None) -> bool:
        """One more call in flight and one more request in the minute; False (nothing taken) when the minute
        already holds ``rpm`` requests."""
        ...

    async def done(self, id: str, tokens: int, ttft_ms: float | None) -> None:
        """The call ended (answered): one fewer in flight, its tokens in the minute, its TTFT averaged."""
        ...

    async def failed(self, id: str, code: str, allowed_fails: int, cooldown: float) -> float | None:
        """The call failed: one fewer in flight, the failure counted; past ``allowed_fails`` in a minute the
        deployment cools down for ``cooldown`` seconds: its end (wall clock) is returned then."""
        ...

    async def free_at(self, id: str, rpm: int | None, tpm: int | None) -> float:
        """When (wall clock) the deployment's minute has room again under ``rpm`` and ``tpm``: the request or
        the tokens that leave it then; 0 when it has room now."""
        ...


@dataclass(slots=True)
class _Local:
    cooled_until: float = 0.0
    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0  # of ``tokens``, kept as they come and go (no sum over the minute per call)
    fails: deque[float] = field(default_factory=deque)
    latency_ms: float | None = None
    latency_at: float = 0.0  # when it was last measured (wall clock)
    errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))


class LocalRouteState:
    """``RouteState`` of one process."""

    def __init__(self, latency_ttl: float = LATENCY_TTL_SECONDS) -> None:
        self._deps: dict[str, _Local] = {}
        self._latency_ttl = latency_ttl

    def _get(self, id: str) -> _Local:
        dep = self._deps.get(id)
        if dep is None:
            dep = self._deps[id] = _Local()
        return dep

    @staticmethod
    def _prune(dep: _Local, now: float) -> None:
        edge = now - WINDOW_SECONDS
        while dep.requests and dep.requests[0] <= edge:
            dep.requests.popleft()
        while dep.tokens and dep.tokens[0][0] <= edge:
            dep.token_sum -= dep.tokens.popleft()[1]
        while dep.fails and dep.fails[0] <= edge:
            dep.fails.popleft()

    async def loads(self, ids: Sequence[str]) -> list[Load]:
        now = time.time()
        out = []
        for id in ids:
            dep = self._get(id)
            self._prune(dep, now)
            out.append(
                Load(
                    dep.cooled_until if dep.cooled_until > now else 0.0,
                    dep.in_flight,
                    len(dep.requests),
                    dep.token_sum,
                    self._latency(dep, now),
                    list(dep.errors),
                )
            )
        return out

    async def take(self, id: str, rpm: int | None) -> bool:
        now = time.time()
        dep = self._get(id)
        self._prune(dep, now)
        if rpm is not None and len(dep.requests) >= rpm:
            return False
        dep.requests.append(now)
        dep.in_flight += 1
        return True

    def _latency(self, dep: _Local, now: float) -> float | None:
        return dep.latency_ms if now - dep.latency_at < self._latency_ttl else None

    async def done(self, id: str, tokens: int, ttft_ms: float | None) -> None:
        now = time.time()
        dep = self._get(id)
        dep.in_flight = max(0, dep.in_flight - 1)
        if tokens > 0:
            dep.tokens.append((now, tokens))
            dep.token_sum += tokens
        if ttft_ms is not None:
            average = self._latency(dep, now)
            dep.latency_ms = ttft_ms if average is None else ema(average, ttft_ms)
            dep.latency_at = now

    async def failed(self, id: str, code: str, allowed_fails: int, cooldown: float) -> float | None:
        now = time.time()
        dep = self._get(id)
        dep.in_flight = max(0, dep.in_flight - 1)
        dep.errors.append((now, code))
        self._prune(dep, now)
        dep.fails.append(now)
        if len(dep.fails) > allowed_fails and cooldown > 0:
            dep.fails.clear()
            dep.cooled_until = max(dep.cooled_until, now + cooldown)
            return dep.cooled_until
        return None

    async def free_at(self, id: str, rpm: int | None, tpm: int | None) -> float:
        dep = self._get(id)
        self._prune(dep, time.time())
        at = 0.0
        if rpm is not None and len(dep.requests) >= rpm:
            at = dep.requests[len(dep.requests) - rpm] + WINDOW_SECONDS  # with it gone, rpm - 1 are left
        if tpm is not None and dep.token_sum >= tpm:
            left = dep.token_sum
            for when, tokens in dep.tokens:  # oldest first, until what is left is under tpm
                left -= tokens
                if left < tpm:
                    at = max(at, when + WINDOW_SECONDS)
                    break
        return at


def ema(average: float, value: float) -> float:
    return (1 - LATENCY_ALPHA) * average + LATENCY_ALPHA * value


# --- the choice -----------------------------------------------------------------------------------


def moves_on(error: ProviderError) -> bool:
    """Whether a call that failed this way before its first byte goes to another deployment, the failure
    counted against this one: rate limited (429), overloaded (529), a server error or a timeout, the
    connection refused or broken, a key missing or refused (401, 403), or its model unknown there (404: the
    model is the deployment's, not the client's). A request the upstream found wrong (400) would fail
    everywhere: it is answered as it is."""
    status = error.status
    if status is not None:
        return status in (401, 403, 404, 408, 429) or status >= 500
    # No status: the connection failed, timed out or broke before the first token, or the key is missing.
    return error.code != "INVALID_MESSAGE"


class Router:
    """The groups of the configuration and the state their choices read."""

    def __init__(self, groups: dict[str, Group], state: RouteState | None = None) -> None:
        self.groups = groups
        self.state: RouteState = state or LocalRouteState()
        self.deployments = {d.id: d for g in groups.values() for d in g.deployments}

    def group(self, model: str) -> Group | None:
        return self.groups.get(model) if self.groups else None

    async def count_failure(self, group: Group, dep: Deployment, error: ProviderError) -> float | None:
        """A failed attempt counted against its deployment (which the caller took): past the group's
        ``allowed_fails`` (``LONE_DEPLOYMENT_FAILS`` at least for a group's only deployment, when the group has no
        fallbacks) it cools down for the upstream's Retry-After, else the group's cooldown. Returns the cooldown's
        end (wall clock), or None when it did not cool down."""
        cooldown = error.retry_after if error.retry_after is not None else group.cooldown_seconds
        allowed = group.allowed_fails
        if len(group.deployments) == 1 and not group.fallbacks:
            allowed = max(allowed, LONE_DEPLOYMENT_FAILS)
        until = await self.state.failed(dep.id, error.code, allowed, cooldown)
        if until is not None:
            log.warning("%s cooled down for %.0fs after %s", dep.id, cooldown, error.code)
        return until

    async def order(self, group: Group, need: Callable[[], int] | None = None) -> tuple[list[Deployment], Busy]:
        """The group's deployments that may take a call now, best first by the group's strategy, and what
        keeps the others (``all_cooling_error`` when none took the call). ``need``: the call's input tokens (its
        ceiling's, counted for its reservation: ``ProviderCall.input_tokens``), asked only of a group with a
        ``tpm``: a deployment takes the call when its minute has room for them too, or holds nothing yet."""
        loads = await self.state.loads([d.id for d in group.deployments])
        ready: list[tuple[Deployment, Load]] = []
        busy = Busy()
        needed: int | None = None
        for dep, load in zip(group.deployments, loads, strict=True):
            if load.cooled_until:
                busy.cooling = True
                busy.until = load.cooled_until if busy.until is None else min(busy.until, load.cooled_until)
                continue
            tpm = dep.tpm
            if tpm is not None and need is not None:
                needed = need() if needed is None else needed
                # Room while the minute holds at most tpm - needed tokens; a call larger than the whole tpm goes to
                # an empty minute (else nowhere, ever).
                tpm = max(1, min(tpm, tpm - needed + 1))
            if (dep.rpm is not None and load.requests >= dep.rpm) or (tpm is not None and load.tokens >= tpm):
                busy.limited = True  # (rare: one more read, for when its minute frees a request or tokens)
                free = await self.state.free_at(dep.id, dep.rpm, tpm)
                if free:
                    busy.until = free if busy.until is None else min(busy.until, free)
                continue
            ready.append((dep, load))
        if group.strategy == "least-busy":
            random.shuffle(ready)  # ties broken at random, not always towards the first
            ready.sort(key=lambda x: x[1].in_flight)
        elif group.strategy == "lowest-latency":
            random.shuffle(ready)
            # Deployments not measured yet go first: they get their measurement.
            ready.sort(key=lambda x: -1.0 if x[1].latency_ms is None else x[1].latency_ms)
        else:
            return weighted_shuffle([d for d, _ in ready]), busy
        return [d for d, _ in ready], busy


def weighted_shuffle(deployments: list[Deployment]) -> list[Deployment]:
    """An order drawn by weight: the first is deployment i with probability weight_i / sum (Efraimidis-Spirakis)."""
    if len(deployments) < 2:
        return deployments
    return sorted(deployments, key=lambda d: random.random() ** (1.0 / d.weight), reverse=True)


@dataclass
class Busy:
    """Why a group's deployments left out of ``Router.order`` could not take a call: some cooling down, some
    full for their minute (rpm/tpm), and the soonest one of them has room again (wall clock; None: unknown)."""

    cooling: bool = False
    limited: bool = False
    until: float | None = None


def all_cooling_error(group: Group, busy: Busy) -> ProviderError:
    """Every deployment of ``group`` is cooling down or full for its minute: a 429 that says which, and (as
    ``Retry-After``) when the first of them has room again."""
    limited = busy.limited or not busy.cooling  # (neither: its rpm's last request was taken meanwhile)
    if limited and not busy.cooling:
        what = "at its rate limit (rpm or tpm) for this minute"
    elif limited:
        what = "cooling down after failures or at its rate limit (rpm or tpm) for this minute"
    else:
        what = "cooling down after failures"
    if busy.until is None:  # another call took the last room meanwhile: it frees up soon
        return ProviderError(
            "RATE_LIMITED",
            f"Every deployment of {group.name!r} is {what}; try again shortly.",
            retry_after=1,
            status=429,
        )
    # Whole seconds, rounded up: Retry-After is an integer (RFC 9110), and earlier would find it busy.
    wait = float(max(1, math.ceil(busy.until - time.time())))
    return ProviderError(
        "RATE_LIMITED",
        f"Every deployment of {group.name!r} is {what}; try again in {wait:.0f}s.",
        retry_after=wait,
        status=429,
    )


# --- requests -------------------------------------------------------------------------------------


def deployment_key(config: Config, dep: Deployment) -> str | None:
    """A deployment's API key: its vault entry, else (no ``key`` given) the provider's own key. None when its
    entry is not in the vault: never another key in its place (another account would be billed)."""
    from .logs import register_secret
    from .vault import KeyVault, resolve_key

    if dep.key is None:
        return resolve_key(config, dep.model.split("/", 1)[0])
    key = KeyVault(config.data_dir).get(dep.key)
    register_secret(key)
    return key


class ModelSource(Protocol):
    """What a deployment's request is made from (``registry.Registry``)."""

    @property
    def config(self) -> Config: ...

    def model_info(self, model: str) -> ModelInfo: ...


def missing_key_error(dep: Deployment) -> ProviderError:
    """``dep`` names a vault entry that is not there: it fails (and the call moves on) rather than call its
    provider with no key, which a provider may fill in from its environment, another account's."""
    prefix = dep.model.split("/", 1)[0]
    return ProviderError(
        "NO_API_KEY",
        f"The deployment {dep.id} uses the key {dep.key!r}, which is not in the vault. "
        f"Run: agentspace keys add {prefix} --name {dep.key}",
    )


def warn_missing_keys(config: Config) -> None:
    """At start: each deployment whose ``key`` is not in the vault (its calls fail until it is added)."""
    import logging

    from .vault import KeyVault, VaultError

    try:
        stored = set(KeyVault(config.data_dir).names())
    except VaultError:
        return  # reported where a key is needed
    for group in config.groups.values():
        for dep in group.deployments:
            if dep.key is not None and dep.key not in stored:
                logging.getLogger(__name__).warning("%s", missing_key_error(dep).message)


def named_key_error(dep: Deployment, error: ProviderError) -> ProviderError:
    """``error`` as a deployment failed with it: a key refused names the deployment's vault entry (the
    provider's own message says how to set the provider's key, which the deployment does not use)."""
    if error.code != "NO_API_KEY" or dep.key is None or f"--name {dep.key}" in error.message:
        return error
    prefix = dep.model.split("/", 1)[0]
    return ProviderError(
        "NO_API_KEY",
        f"The upstream of the deployment {dep.id} refused its key {dep.key!r}. "
        f"Run: agentspace keys add {prefix} --name {dep.key}",
        status=error.status,
    )


def deployment_request(gw: ModelSource, request: ProviderRequest, dep: Deployment) -> ProviderRequest:
    """``request`` (made for the group) as ``dep`` gets it: its model, key, base_url and provider options.
    ProviderError (``missing_key_error``) when its vault entry is missing."""
    settings = gw.config.provider_settings(dep.model.split("/", 1)[0])
    info = gw.model_info(dep.model)
    key = deployment_key(gw.config, dep)
    if key is None and dep.key is not None:
        raise missing_key_error(dep)
    return replace(
        request,
        model=dep.model,
        model_info=info,
        api_key=key,
        base_url=dep.base_url or settings["base_url"],
        options=settings,
    )


# --- what the deployments page shows ----------------------------------------------------------------


async def deployment_states(router: Router) -> list[dict[str, Any]]:
    """Each deployment's state now (``GET /api/deployments``): active or cooling down until when, calls in
    flight, the minute's requests and tokens against its limits, its TTFT average and its recent errors."""
    from datetime import UTC, datetime

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    deployments = list(router.deployments.values())
    loads = await router.state.loads([d.id for d in deployments])
    now = time.time()
    out = []
    for dep, load in zip(deployments, loads, strict=True):
        group = router.groups[dep.group]
        out.append(
            {
                "id": dep.id,
                "group": dep.group,
                "name": dep.name,
                "model": dep.model,
                "key": dep.key,
                "baseUrl": dep.base_url,
                "weight": dep.weight,
                "strategy": group.strategy,
                "state": "cooling" if load.cooled_until else "active",
                "coolingUntil": iso(load.cooled_until) if load.cooled_until else None,
                "coolingSeconds": round(max(0.0, load.cooled_until - now), 1) if load.cooled_until else 0.0,
                "inFlight": load.in_flight,
                "requestsLastMinute": load.requests,
                "rpm": dep.rpm,
                "tokensLastMinute": load.tokens,
                "tpm": dep.tpm,
                "latencyMs": None if load.latency_ms is None else round(load.latency_ms, 1),
                "recentErrors": [{"time": iso(t), "code": code} for t, code in reversed(load.errors)],
            }
        )
    return out
