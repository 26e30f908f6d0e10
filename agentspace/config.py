"""Configuration: a TOML file (README.md#configuration), validated against one schema, with defaults.

Every key, its type and default is listed in ``SCHEMA``; ``config.example.toml`` documents the same keys
and a test keeps the two in step. Errors name the file, the key and what was expected.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

DEFAULT_FORMATTING_PROMPT = (
    "Format answers in Markdown. Put code in fenced code blocks with a language tag. "
    "Be concise; use lists and tables only where they help."
)

# The media types the gateway can send to a model (Anthropic's image and document blocks, litellm's image_url
# and file parts): [attachments] media_types takes these only (docs/attachments.md).
SENDABLE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf")

# section -> key -> (expected type(s), default). ``None`` as a default means "not set".
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "server": {
        "host": ((str,), "127.0.0.1"),
        "port": ((int,), 3271),
        "allowed_origins": ((list,), []),
        "allowed_hosts": ((list,), []),
        "max_body_bytes": ((int,), 1_048_576),
        "max_frame_bytes": ((int,), 1_048_576),
        "auth_timeout_seconds": ((int, float), 10.0),
        "heartbeat_seconds": ((int, float), 30.0),
        "messages_per_minute": ((int,), 600),
        "shutdown_grace_seconds": ((int, float), 10.0),
        "event_loop": ((str,), "auto"),
        "header_timeout_seconds": ((int, float), 10.0),
        "max_connections": ((int,), 256),
    },
    "storage": {
        "data_dir": ((str,), None),
        "backend": ((str,), "tinydb"),
        "dsn": ((str,), None),
        "redis_url": ((str,), None),
        "pool_size": ((int,), 10),
        "statement_cache_size": ((int,), 100),
        # How long a replica that stopped (killed, cut off) keeps what it held (README.md, docs/accounting.md).
        "lease_seconds": ((int, float), 20.0),
    },
    "models": {
        "default": ((str,), "anthropic/claude-sonnet-4-6"),
        "fallback_input_per_mtok": ((int, float), 15.0),
        "fallback_output_per_mtok": ((int, float), 75.0),
        "fallbacks": ((dict,), {}),
        # Model groups over several deployments (agentspace/routing.py), validated by routing.parse_groups.
        "groups": ((dict,), {}),
    },
    "chat": {
        "system_prompt": ((str,), "You are a helpful assistant."),
        "formatting_prompt": ((str,), DEFAULT_FORMATTING_PROMPT),
        "history_limit": ((int,), 50),
        "max_steps": ((int,), 8),
        "max_tokens": ((int,), 4096),
        "on_disconnect": ((str,), "finish"),
        "idle_timeout_seconds": ((int, float), 120.0),
        "section_timeout_seconds": ((int, float), 10.0),
        "tool_timeout_seconds": ((int, float), 120.0),
        "max_retries": ((int,), 2),
        "prompt_cache": ((str,), "auto"),
        "prompt_cache_ttl": ((str,), "5m"),
        "context_policy": ((str,), "compact"),
        "compact_model": ((str,), None),
        # Whether /api/chat fetches the http(s) URLs of file parts (docs/attachments.md); off: a 400.
        "fetch_urls": ((bool,), False),
    },
    # Images and documents in sessions (docs/attachments.md).
    "attachments": {
        "max_file_bytes": ((int,), 20 * 1024 * 1024),
        "max_session_bytes": ((int,), 100 * 1024 * 1024),
        "media_types": ((list,), list(SENDABLE_MEDIA_TYPES)),
        "fetch_timeout_seconds": ((int, float), 10.0),
    },
    "thinking": {
        "enabled": ((bool,), True),
        "budget_tokens": ((int,), 8000),
    },
    # The drop-in /v1 APIs (README.md#use-it-from-your-tools).
    "v1": {
        # Prompt-cache breakpoints on an OpenAI-shaped request translated for Claude (docs/sessions.md).
        "prompt_cache": ((str,), "requested"),
    },
    "limits": {
        "uncountable_input_tokens": ((int,), None),
        "server_tool_max_uses": ((int,), 10),
    },
    "logging": {
        "level": ((str,), "info"),
    },
    "metrics": {
        "public": ((bool,), False),
    },
    "telemetry": {
        "otlp_endpoint": ((str,), None),
        "capture_content": ((bool,), False),
    },
    "alerts": {
        "webhook_url": ((str,), None),
        "thresholds": ((list,), [0.8, 1.0]),
        "timeout_seconds": ((int, float), 10.0),
    },
}

# Keys of each [providers.NAME] table.
PROVIDER_SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = {
    "base_url": ((str,), None),
    "api_key_env": ((str,), None),
    "key_name": ((str,), None),
    "timeout_seconds": ((int, float), 600.0),
    "models": ((list,), []),
    "options": ((dict,), {}),
}

# Keys of each [pricing."MODEL"] table, and of what a provider's ``model_info(model)`` returns.
PRICING_SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = {
    "input_per_mtok": ((int, float), None),
    "output_per_mtok": ((int, float), None),
    "cache_read_per_mtok": ((int, float), None),
    "cache_write_per_mtok": ((int, float), None),
    "context_window": ((int,), None),
    "max_output_tokens": ((int,), None),
    "supports_reasoning": ((bool,), None),
    "supports_tools": ((bool,), None),
    "supports_vision": ((bool,), None),
    "supports_pdf_input": ((bool,), None),
    "deprecation_date": ((str,), None),
    "long_context": ((list,), None),
    # US dollars per use of a server tool the upstream runs and bills per use (calls.server_tool_price).
    "web_search_per_use": ((int, float), None),
    "web_fetch_per_use": ((int, float), None),
    "code_execution_per_use": ((int, float), None),
}
# Keys of each table of ``long_context = [{above_input_tokens = 200000, input_per_mtok = 6, ...}]``.
TIER_SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = {
    "above_input_tokens": ((int,), None),
    "input_per_mtok": ((int, float), None),
    "output_per_mtok": ((int, float), None),
    "cache_read_per_mtok": ((int, float), None),
    "cache_write_per_mtok": ((int, float), None),
}
# A [pricing] key with one of these is a pattern (fnmatch): "reverse/*", "openai/gpt-4o-*".
PATTERN_CHARS = frozenset("*?[")


def is_pattern(key: str) -> bool:
    return not PATTERN_CHARS.isdisjoint(key)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a model pattern, or None: it needs a literal ``provider/`` and closed brackets."""
    prefix, slash, rest = pattern.partition("/")
    if not slash or not prefix or is_pattern(prefix):
        return 'a pattern needs a literal provider prefix, like "reverse/*" or "openai/gpt-4o-*"'
    if not rest:
        return 'nothing after the provider prefix; to match every model of a provider write "PREFIX/*"'
    depth = 0
    for ch in rest:
        if ch == "[":
            if depth:
                return "a '[' inside brackets"
            depth = 1
        elif ch == "]":
            depth = 0
    if depth:
        return "an unclosed '['"
    return None


def validate_model_table(source: str, key: str, table: Any) -> dict[str, Any]:
    """A ``[pricing."MODEL"]`` table (or a provider's model info): the keys it sets, checked; errors name
    ``source`` and ``key``."""
    checked = {k: v for k, v in _validate_table(source, key, table, PRICING_SCHEMA).items() if v is not None}
    tiers = []
    for i, tier in enumerate(checked.get("long_context", [])):
        values = _validate_table(source, f"{key}.long_context[{i}]", tier, TIER_SCHEMA)
        for required in ("above_input_tokens", "input_per_mtok", "output_per_mtok"):
            if values[required] is None:
                raise ConfigError(source, f"{key}.long_context[{i}].{required}", "missing (required in a tier)")
        tiers.append(values)
    if "long_context" in checked:
        checked["long_context"] = sorted(tiers, key=lambda t: t["above_input_tokens"])
    return checked


CHOICES = {
    ("server", "event_loop"): ("auto", "uvloop", "asyncio"),
    ("chat", "on_disconnect"): ("finish", "abort"),
    ("chat", "prompt_cache"): ("auto", "off"),
    ("chat", "prompt_cache_ttl"): ("5m", "1h"),
    ("v1", "prompt_cache"): ("requested", "always", "off"),
    ("chat", "context_policy"): ("compact", "truncate", "refuse"),
    ("logging", "level"): ("debug", "info", "warning", "error"),
}


class ConfigError(click.ClickException):
    """A configuration problem, reported as ``FILE: KEY: expected ..., got ...``."""

    def __init__(self, source: str, key: str, expected: str) -> None:
        super().__init__(f"{source}: {key}: {expected}")
        self.source = source
        self.key = key


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES[t] for t in types)


def _check(source: str, key: str, value: Any, types: tuple[type, ...]) -> Any:
    # bool is an int in Python; reject it where a number is wanted, and accept ints where floats are.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(source, key, f"expected {_type_name(types)}, got {value!r}")
    # TOML has nan and inf; no setting means them, and a NaN limit compares false with everything.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"expected a finite number, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise ConfigError(source, key, f"expected a number 0 or more, got {value!r}")
    return value


def _validate_table(
    source: str, prefix: str, table: Any, schema: dict[str, tuple[tuple[type, ...], Any]]
) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, f"expected a table, got {table!r}")
    out = {
        k: (list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d) for k, (_, d) in schema.items()
    }
    for key, value in table.items():
        if key not in schema:
            known = ", ".join(schema)
            raise ConfigError(source, f"{prefix}.{key}", f"unknown key (known keys: {known})")
        out[key] = _check(source, f"{prefix}.{key}", value, schema[key][0])
    return out


@dataclass
class Config:
    """The validated configuration. ``section("chat")["max_steps"]`` style access, plus helpers."""

    values: dict[str, dict[str, Any]]
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    pricing: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<defaults>"
    base_dir: Path = field(default_factory=Path.cwd)
    # name -> routing.Group: the model groups of ``[models.groups]``.
    groups: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def plugin_settings(
        self, name: str, schema: dict[str, tuple[tuple[type, ...], Any]] | None = None
    ) -> dict[str, Any]:
        """The ``[plugins.NAME]`` table of a plugin ({} when absent).

        With a ``schema`` (key -> (accepted types, default)), unknown keys and wrong types raise a
        ``ConfigError`` naming ``plugins.NAME.KEY``, and missing keys get their defaults.
        """
        table = self.plugins.get(name, {})
        if schema is None:
            return table
        return _validate_table(self.source, f"plugins.{name}", table, schema)

    def provider_settings(self, prefix: str) -> dict[str, Any]:
        """The ``[providers.PREFIX]`` table, with defaults for every key."""
        if prefix in self.providers:
            return self.providers[prefix]
        return _validate_table(self.source, f"providers.{prefix}", {}, PROVIDER_SCHEMA)

    def resolve_path(self, value: str) -> Path:
        """Paths in the config are relative to the config file's folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.base_dir / path

    @property
    def data_dir(self) -> Path:
        configured = self.values["storage"]["data_dir"]
        if configured:
            return self.resolve_path(configured)
        return default_data_dir()


def default_data_dir() -> Path:
    env = os.environ.get("AGENTSPACE_HOME")
    return Path(env) if env else Path(click.get_app_dir("agentspace"))


def parse_config(raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> Config:
    values: dict[str, dict[str, Any]] = {}
    for section, schema in SCHEMA.items():
        values[section] = _validate_table(source, section, raw.get(section, {}), schema)
    _check_values(source, values)

    known = set(SCHEMA) | {"providers", "pricing", "plugins"}
    for section in raw:
        if section not in known:
            raise ConfigError(source, section, f"unknown section (known: {', '.join(sorted(known))})")

    providers = {}
    for name, table in _table(source, "providers", raw.get("providers", {})).items():
        providers[name] = _validate_table(source, f"providers.{name}", table, PROVIDER_SCHEMA)
    pricing = _pricing(source, raw.get("pricing", {}))
    plugins = {
        name: _table(source, f"plugins.{name}", t)
        for name, t in _table(source, "plugins", raw.get("plugins", {})).items()
    }
    groups = {}
    if values["models"]["groups"] != {}:  # routing (and the provider events it imports) only when configured
        from .routing import parse_groups

        groups = parse_groups(source, values["models"]["groups"], list(pricing), list(values["models"]["fallbacks"]))
    return Config(values, providers, pricing, plugins, source, base_dir or Path.cwd(), groups)


def _check_values(source: str, values: dict[str, dict[str, Any]]) -> None:
    """The checks of values a type alone does not make: choices, ranges, lists of model ids."""
    for (section, key), choices in CHOICES.items():
        if values[section][key] not in choices:
            raise ConfigError(
                source, f"{section}.{key}", f"expected one of {', '.join(choices)}, got {values[section][key]!r}"
            )
    _check_server(source, values["server"])
    if values["storage"]["lease_seconds"] < 2:  # renewed every quarter: more often would load the database
        raise ConfigError(
            source, "storage.lease_seconds", f"expected 2 seconds or more, got {values['storage']['lease_seconds']}"
        )
    for section, key in (
        ("chat", "history_limit"),
        ("chat", "max_steps"),
        ("chat", "max_tokens"),
        ("thinking", "budget_tokens"),
    ):
        if values[section][key] < (0 if key == "history_limit" else 1):
            raise ConfigError(source, f"{section}.{key}", f"expected a positive integer, got {values[section][key]}")
    for key in ("section_timeout_seconds", "tool_timeout_seconds"):
        if values["chat"][key] <= 0:
            raise ConfigError(source, f"chat.{key}", f"expected a positive number, got {values['chat'][key]}")
    if values["thinking"]["budget_tokens"] < 1024:
        raise ConfigError(
            source,
            "thinking.budget_tokens",
            f"expected at least 1024 (the API's minimum), got {values['thinking']['budget_tokens']}",
        )
    media_types = values["attachments"]["media_types"]
    if not all(isinstance(t, str) and t.lower() in SENDABLE_MEDIA_TYPES for t in media_types):
        raise ConfigError(
            source,
            "attachments.media_types",
            f"expected some of {', '.join(SENDABLE_MEDIA_TYPES)} (the types the gateway sends), got {media_types!r}",
        )
    for model, chain in values["models"]["fallbacks"].items():
        if not isinstance(chain, list) or not all(isinstance(m, str) for m in chain):
            raise ConfigError(source, f"models.fallbacks.{model}", "expected a list of model ids")

    thresholds = values["alerts"]["thresholds"]
    if not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 10 for t in thresholds):
        raise ConfigError(
            source, "alerts.thresholds", f"expected fractions of the budget such as [0.8, 1.0], got {thresholds!r}"
        )


def _check_server(source: str, server: dict[str, Any]) -> None:
    for key in ("port",):
        port = server[key]
        if not 0 <= port <= 65535:
            raise ConfigError(source, "server.port", f"expected a port number 0-65535, got {port}")
    if server["max_connections"] < 1:
        raise ConfigError(
            source, "server.max_connections", f"expected a positive integer, got {server['max_connections']}"
        )
    if server["header_timeout_seconds"] <= 0:
        raise ConfigError(
            source,
            "server.header_timeout_seconds",
            f"expected a positive number, got {server['header_timeout_seconds']}",
        )


def _pricing(source: str, raw: Any) -> dict[str, Any]:
    pricing = {}
    for model, table in _table(source, "pricing", raw).items():
        problem = pattern_problem(model) if is_pattern(model) else None
        if problem:
            raise ConfigError(source, f'pricing."{model}"', f"malformed model pattern: {problem}")
        pricing[model] = validate_model_table(source, f'pricing."{model}"', table)
    return pricing


def _table(source: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a table, got {value!r}")
    return value


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a TOML config file; ``None`` gives the defaults."""
    if path is None:
        return parse_config({}, "<defaults>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), "(file)", f"cannot be read: {e.strerror or e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), "(syntax)", f"not valid TOML: {e}") from None
    return parse_config(raw, str(p), p.resolve().parent)
