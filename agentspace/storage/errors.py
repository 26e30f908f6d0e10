"""The errors every backend's stores raise, the same whatever keeps the data (``protocols.py``)."""

from __future__ import annotations


class InvalidSessionId(ValueError):
    """A session id that is not 1-128 characters of A-Z a-z 0-9 _ - (it is used as a file name)."""


class SessionExists(ValueError):
    """``create`` with the id of an existing session."""


class SessionNotFound(LookupError):
    """A change to a session that does not exist (or whose id is invalid, so cannot exist)."""


class MessageNotFound(LookupError):
    """``update_message`` with an id no message of the session has."""


class ClientExists(ValueError):
    """``add`` (or a rename) with the name of an existing client."""


class ClientNotFound(KeyError):
    """A client name no client has."""
