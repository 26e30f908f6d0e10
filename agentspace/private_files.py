"""The data directory and the secrets files in it (``keys.json``, ``gateway-token``): checks and safe reads.

Whoever can write a secrets file can let themselves in (their own gateway token) or redirect the owner's
traffic to an account they read (their own provider key). So, at start and at every read:

- The data directory must belong to the user running agentspace (else refused). If other users may write
  it, its mode is set to 0700 with a warning: tightening our own directory is always safe, and every
  secrets file in it is then checked on its own.
- A secrets file is refused when it is a symbolic link (opened with ``O_NOFOLLOW``), not a regular file,
  owned by another user, or writable by other users: its content may not be ours. One that others may
  only read is set to 0600 with a warning.
- Its content must be UTF-8 text.

Refusals are ``PrivateFileError``s: one line naming the file and the fix (``serve`` stops on them).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import click

log = logging.getLogger(__name__)

# Secrets files are a few hundred bytes; anything far larger is not one of ours.
MAX_SECRETS_FILE_BYTES = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in the file's place must not block the open


class PrivateFileError(click.ClickException):
    """The data directory or a secrets file cannot be trusted or read; the message names the fix."""


def _foreign(st: os.stat_result) -> bool:
    """Whether another user owns the file (never where the system has no user ids)."""
    return hasattr(os, "geteuid") and st.st_uid != os.geteuid()


def _service_user(path: Path, st: os.stat_result) -> str | None:
    """The user's name when root reads a file that user owns in a directory that user owns: a data directory
    of a server run as a user of its own, where removing or rewriting the file as root (the usual fix) would
    leave a root-owned file that server refuses at its next start."""
    if os.geteuid() != 0:
        return None
    try:
        if os.stat(path.parent).st_uid != st.st_uid:
            return None
        import pwd

        return pwd.getpwuid(st.st_uid).pw_name
    except (OSError, KeyError):
        return None


def check_data_dir(path: Path) -> None:
    """Create the data directory 0700 if missing; refuse one owned by another user; tighten a loose mode."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.stat(path)
    except OSError as e:
        raise PrivateFileError(f"Cannot use the data directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateFileError(f"The data directory {path} is not a directory. Move it away or set [storage] data_dir.")
    if _foreign(st):
        raise PrivateFileError(
            f"The data directory {path} belongs to another user (uid {st.st_uid}); "
            "use a directory of your own ([storage] data_dir or AGENTSPACE_HOME)."
        )
    if st.st_mode & 0o022:
        log.warning(
            "%s was writable by other users (mode %o); setting its mode to 0700", path, stat.S_IMODE(st.st_mode)
        )
        os.chmod(path, 0o700)


def read_private_file(path: Path, fix: str) -> str | None:
    """The text of a secrets file, None when it does not exist; ``fix`` ends every refusal's message."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise PrivateFileError(
                f"{path} is a symbolic link; agentspace reads secrets only from a file of its own. {fix}"
            ) from None
        raise PrivateFileError(f"Cannot read {path}: {e.strerror or e}. {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{path} is not a regular file. {fix}")
        if _foreign(st):
            owner = _service_user(path, st)
            if owner is not None:  # root on a service's data directory (docs/deploy.md): the file is fine
                raise PrivateFileError(
                    f"{path} belongs to {owner}, whose data directory this is; agentspace reads secrets files "
                    f"only as their owner. Run the command as {owner}: runuser -u {owner} -- agentspace ..."
                )
            raise PrivateFileError(
                f"{path} belongs to another user (uid {st.st_uid}), so its content cannot be trusted. {fix}"
            )
        if st.st_mode & 0o022:
            raise PrivateFileError(
                f"{path} is writable by other users, so its content cannot be trusted. Check it, "
                f"then run: chmod 600 {path}"
            )
        if st.st_size > MAX_SECRETS_FILE_BYTES:
            raise PrivateFileError(f"{path} is {st.st_size} bytes, far too large for a secrets file. {fix}")
        if st.st_mode & 0o044:
            log.warning("%s was readable by other users; setting its mode to 0600", path)
            os.fchmod(fd, 0o600)
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_SECRETS_FILE_BYTES:
                raise PrivateFileError(f"{path} is far too large for a secrets file. {fix}")
    except OSError as e:
        raise PrivateFileError(f"Cannot read {path}: {e.strerror or e}. {fix}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrivateFileError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}). {fix}") from None
