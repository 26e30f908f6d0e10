"""Provider API keys ("the vault"): ``keys.json`` in the data directory, mode 0600, never echoed.

Lookup order for a provider prefix: the vault (key name = ``[providers.PREFIX] key_name`` or the prefix),
then the environment variable (``[providers.PREFIX] api_key_env`` or ``PREFIX_API_KEY``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .logs import register_secret
from .private_files import PrivateFileError, read_private_file
from .providers.base import display_name
from .storage.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from .config import Config

KEYS_FILE = "keys.json"
NOTE = "API keys for agentspace. Do not share."

DEFAULT_ENV_VARS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}


class VaultError(PrivateFileError):
    """keys.json exists but cannot be trusted, read or parsed."""


def ensure_private_dir(path: Path) -> None:
    """Create the data directory 0700 (an existing one is left as the user made it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` with mode 0600 through the one atomic writer (``storage.atomic.write_bytes_atomic``).

    A crash leaves either the old or the new file, never a half-written one, and the secret is never
    readable by others, not even for a moment (the temp file is created 0600).
    """
    ensure_private_dir(path.parent)
    write_bytes_atomic(path, text.encode("utf-8"))


def mask(value: str) -> str:
    """``sk-ant-...a1b2``: enough to tell keys apart, too little to use. Short values are fully hidden."""
    return f"{value[:7]}...{value[-4:]}" if len(value) >= 16 else "****"


# keys.json as last parsed, per path, with the (inode, mtime, size) it had: the server looks a key up on
# every provider call, and a stat is far cheaper than a read and a parse.
_parsed: dict[Path, tuple[tuple[int, int, int], dict[str, str]]] = {}


class KeyVault:
    """Named secrets in ``DATA_DIR/keys.json``: ``{"__note__": ..., "keys": {name: value}}``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / KEYS_FILE

    def _read(self) -> dict[str, str]:
        try:
            st = os.lstat(self.path)  # lstat: a symlink put in the file's place is a change, and refused below
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise VaultError(f"Cannot read {self.path}: {e.strerror or e}") from None
        # Every write replaces the file (a new inode), so an unchanged stat means unchanged keys.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _parsed.get(self.path)
        if cached is not None and cached[0] == stamp:
            return dict(cached[1])
        fix = "Fix it, or remove it and add the keys again (agentspace keys add NAME)."
        try:
            text = read_private_file(self.path, fix)
        except PrivateFileError as e:
            raise VaultError(e.message) from None
        if text is None:
            return {}
        try:
            data: Any = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError) as e:
            raise VaultError(f"{self.path} is not valid JSON ({e}). {fix}") from None
        keys = data.get("keys", {}) if isinstance(data, dict) else None
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise VaultError(f'{self.path}: expected {{"keys": {{"NAME": "KEY", ...}}}}. {fix}')
        found = {str(k): v for k, v in keys.items()}
        for value in found.values():
            register_secret(value)  # kept out of the logs from now on
        _parsed[self.path] = (stamp, found)
        return dict(found)

    def _write(self, keys: dict[str, str]) -> None:
        payload = {"__note__": NOTE, "keys": dict(sorted(keys.items()))}
        write_private_file(self.path, json.dumps(payload, indent=2) + "\n")

    def get(self, name: str) -> str | None:
        return self._read().get(name) or None

    def set(self, name: str, value: str) -> None:
        keys = self._read()
        keys[name] = value
        self._write(keys)

    def remove(self, name: str) -> bool:
        keys = self._read()
        if name not in keys:
            return False
        del keys[name]
        self._write(keys)
        return True

    def names(self) -> list[str]:
        return sorted(self._read())

    def masked(self) -> dict[str, str]:
        """Every stored key name with its masked value, for listings."""
        return {name: mask(value) for name, value in sorted(self._read().items())}


def key_name(config: Config, prefix: str) -> str:
    """The vault entry used for a provider prefix."""
    return config.provider_settings(prefix)["key_name"] or prefix


def env_var(config: Config | None, prefix: str) -> str:
    """The environment variable used as fallback for a provider prefix."""
    configured = config.provider_settings(prefix)["api_key_env"] if config is not None else None
    return configured or DEFAULT_ENV_VARS.get(prefix) or f"{prefix.upper().replace('-', '_')}_API_KEY"


def resolve_key(config: Config, prefix: str) -> str | None:
    """The API key for a provider prefix: the vault first, then the environment; None when neither has one."""
    stored = KeyVault(config.data_dir).get(key_name(config, prefix))
    if stored:
        return stored
    from_env = os.environ.get(env_var(config, prefix)) or None
    register_secret(from_env)
    return from_env


def missing_key_message(prefix: str, config: Config | None = None) -> str:
    """``Anthropic API key not configured. Run: agentspace keys add anthropic``."""
    name = key_name(config, prefix) if config is not None else prefix
    return f"{display_name(prefix)} API key not configured. Run: agentspace keys add {name}"


def register_configured_keys(config: Config) -> None:
    """Register every key the server could use for redaction from the logs: the vault's, and the values of
    the providers' environment variables."""
    try:
        KeyVault(config.data_dir).names()  # reading the vault registers every key in it
    except VaultError:
        pass  # reported where a key is needed
    for name in {*DEFAULT_ENV_VARS.values(), *(env_var(config, prefix) for prefix in config.providers)}:
        register_secret(os.environ.get(name))
