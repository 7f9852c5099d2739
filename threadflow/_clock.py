"""Clocks: real elapsed time for deadlines, the (possibly frozen) wall clock for timestamps."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable

# Deadlines must measure real time even under freezegun, which replaces
# ``time.monotonic`` in every module attribute that refers to it. A reference
# kept inside a tuple is out of its reach; if freezegun is already active when
# we are imported, take its saved original.
_api = sys.modules.get("freezegun.api")
_REAL: tuple[Callable[[], float], Callable[[], float]] = (
    getattr(_api, "real_monotonic", None) or time.monotonic,
    getattr(_api, "real_time", None) or time.time,
)


def monotonic() -> float:
    """Real seconds from an arbitrary origin, never frozen."""
    return _REAL[0]()


def wall() -> float:
    """Real seconds since the epoch, never frozen: for leases and heartbeats between processes."""
    return _REAL[1]()


def utcnow() -> datetime.datetime:
    """The wall clock as an aware UTC datetime; follows ``freezegun`` (looked up per call)."""
    return datetime.datetime.now(datetime.timezone.utc)
