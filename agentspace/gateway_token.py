"""The gateway token: every client but ``/healthz`` must present it (docs/protocol.md#authentication).

Generated on first use (32 random bytes, URL-safe), stored in ``DATA_DIR/gateway-token`` with mode 0600,
compared in constant time. ``agentspace token --rotate`` replaces the file; a running server notices the
new file through ``TokenFile.current()`` and accepts only the new token from then on.

Replicas agree on one token by sharing the file (one data directory) or through the environment:
``AGENTSPACE_GATEWAY_TOKEN``, when set, is the token and the file is not used.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from .logs import register_secret
from .private_files import PrivateFileError, check_data_dir, read_private_file
from .vault import KeyVault, ensure_private_dir, write_private_file

log = logging.getLogger(__name__)

TOKEN_FILE = "gateway-token"
TOKEN_ENV = "AGENTSPACE_GATEWAY_TOKEN"
MIN_ENV_TOKEN = 16  # characters: a short token in the environment is a mistake, not a secret


def token_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / TOKEN_FILE


def _new_token() -> str:
    token = secrets.token_urlsafe(32)  # 32 random bytes -> 43 characters
    register_secret(token)
    return token


# A token travels in an HTTP header and a JSON frame: visible ASCII only, no spaces.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


def _read(path: Path) -> str | None:
    """The token in ``path``; None when the file is missing or empty. Refuses (``PrivateFileError``) a file
    that is a symlink, another user's, writable by others, not UTF-8, or not a usable token."""
    fix = "Run `agentspace token --rotate` to write a new one."
    text = read_private_file(path, fix)
    if text is None:
        return None
    token = text.strip()
    if not set(token) <= _TOKEN_CHARS:
        raise PrivateFileError(f"{path} does not hold a usable token (only visible ASCII, no spaces). {fix}")
    register_secret(token)  # kept out of the logs from now on
    return token or None


def load_or_create_token(data_dir: str | os.PathLike[str]) -> str:
    """The current token, creating the file on first use."""
    path = token_path(data_dir)
    token = _read(path)
    if token:
        return token
    ensure_private_dir(path.parent)
    token = _new_token()
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    write_private_file(tmp, token + "\n")
    try:
        # link() fails if the file appeared meanwhile (a server and a CLI starting together): both
        # processes then use the first token instead of silently overwriting each other's.
        os.link(tmp, path)
    except FileExistsError:
        existing = _read(path)
        if existing:
            return existing
        os.replace(tmp, path)
    except OSError:  # file systems without hard links
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return token


def env_token() -> str | None:
    """The token replicas were given through the environment, or None (then the file is the token)."""
    return os.environ.get(TOKEN_ENV) or None


# Written by a server that takes its token from the variable (removed by one that reads the file): the CLI
# without the variable must not hand out the file's token, which that server refuses.
FROM_ENV_FILE = "gateway-token-from-env"


def note_token_source(data_dir: str | os.PathLike[str]) -> None:
    """A starting server notes whether its token is the variable's."""
    path = Path(data_dir) / FROM_ENV_FILE
    if env_token() is None:
        path.unlink(missing_ok=True)
    else:
        write_private_file(path, TOKEN_ENV + "\n")


def client_token(data_dir: str | os.PathLike[str]) -> str:
    """The token a server started from this environment and data directory accepts: the variable when
    set (it wins over the file, as in ``TokenFile``), else the file's -- unless the data directory's server
    took its token from the variable, which this environment lacks."""
    token = env_token()
    if token:
        return token
    check_file_token(data_dir)
    return load_or_create_token(data_dir)


def check_file_token(data_dir: str | os.PathLike[str]) -> None:
    """Refuse to use the file's token when the data directory's server takes the variable's instead."""
    if (Path(data_dir) / FROM_ENV_FILE).exists():
        raise PrivateFileError(
            f"The server of {data_dir} takes its token from {TOKEN_ENV}, which is not set here; it refuses the "
            f"token of {token_path(data_dir)}. Set the variable as the server has it (docs/deploy.md: "
            "set -a; . /etc/agentspace/env; set +a); chat and ask also take --token."
        )


def rotate_token(data_dir: str | os.PathLike[str]) -> str:
    """Replace the token; the old one stops working as soon as running servers see the new file."""
    token = _new_token()
    write_private_file(token_path(data_dir), token + "\n")
    return token


def token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; an empty or missing token never matches. ``surrogatepass``: a header's bytes that
    are no UTF-8 (and an auth frame's lone surrogates) arrive as surrogates, a wrong token like any other."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass"))


class TokenFile:
    """The token of a running server, re-read only when the file changes (rotation without restart).

    ``current()`` costs one ``os.stat``; rotation replaces the file (new inode), which is what we watch.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = token_path(data_dir)
        self._env = env_token()
        if self._env is not None:
            if len(self._env) < MIN_ENV_TOKEN:
                raise PrivateFileError(f"{TOKEN_ENV} is shorter than {MIN_ENV_TOKEN} characters; use a random token.")
            if any(c.isspace() for c in self._env):
                # systemd's EnvironmentFile keeps what follows the value on its line ("TOKEN  # a comment"), where
                # a shell that sources the same file drops it: the servers and the admin's shell would disagree.
                raise PrivateFileError(
                    f"{TOKEN_ENV} has a space in it: in a systemd EnvironmentFile a comment after the value is "
                    "part of the value; put comments on lines of their own."
                )
            register_secret(self._env)
            self._token = self._env
        else:
            self._token = load_or_create_token(data_dir)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(self.path)  # a symlink put in the file's place is a change (and refused)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> str:
        if self._env is not None:  # replicas configured through the environment
            return self._env
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            try:
                token = _read(self.path)
            except PrivateFileError as e:  # a running server keeps the last good token rather than fail every request
                log.error("%s Keeping the previous gateway token.", e.message)
                return self._token
            if token:  # a deleted or emptied file keeps the last good token
                self._token = token
                log.info("gateway token changed; using the new one")
        return self._token


ADDRESS_FILE = "server-address"  # the WebSocket URL the data directory's server last listened on


def write_server_address(data_dir: str | os.PathLike[str], url: str) -> None:
    write_private_file(Path(data_dir) / ADDRESS_FILE, url + "\n")


def replace_server_address(data_dir: str | os.PathLike[str], url: str) -> str | None:
    """Announce ``url`` as the data directory's server; returns what the file held before (None: nothing)."""
    before = _announced(data_dir)
    write_server_address(data_dir, url)
    return before


def _announced(data_dir: str | os.PathLike[str]) -> str | None:
    try:
        return (Path(data_dir) / ADDRESS_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def give_back_server_address(data_dir: str | os.PathLike[str], url: str, before: str | None) -> None:
    """At a server's stop: put back the address its start replaced when that was another server's (a second
    ``serve`` on the data directory, stopped while the first runs) and the file still holds its own. The workers
    of ``serve --workers`` announce one address, which stays."""
    if before is None or before == url or _announced(data_dir) != url:
        return
    write_server_address(data_dir, before)


def read_server_address(data_dir: str | os.PathLike[str]) -> str | None:
    """The URL written by the last ``serve`` on this data directory (a wildcard bind becomes loopback)."""
    url = _announced(data_dir)
    if url is None or not url.startswith(("ws://", "wss://")):
        return None
    for wildcard in ("//0.0.0.0:", "//[::]:"):
        url = url.replace(wildcard, "//127.0.0.1:")
    return url


def check_secrets(data_dir: str | os.PathLike[str]) -> None:
    """Check the data directory and read both secrets files (creating the token on first start).

    ``serve`` runs this before anything binds: a damaged or foreign ``keys.json`` or ``gateway-token`` stops
    the start with one line naming the file and the fix (a ``PrivateFileError``), not every chat later."""
    check_data_dir(Path(data_dir))
    load_or_create_token(data_dir)
    KeyVault(data_dir).names()
