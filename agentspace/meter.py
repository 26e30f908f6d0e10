"""Moved: the meter is now part of every provider call's one lifecycle, ``agentspace.calls.ProviderCall``
(admission, reservation, write-ahead, the one usage record). These names stay for code written against it."""

from __future__ import annotations

from .calls import ALL_FIELDS, INPUT_FIELDS, OUTPUT_FIELDS, ProviderCall

Meter = ProviderCall

__all__ = ["ALL_FIELDS", "INPUT_FIELDS", "OUTPUT_FIELDS", "Meter", "ProviderCall"]
