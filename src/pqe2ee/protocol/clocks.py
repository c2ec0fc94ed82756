"""The two time domains of the client, kept apart by type.

The protocol never reads a clock: callers pass time in. Two different clocks meet in
discovery, and mixing them is a silent bug (a monotonic reading compared with a Unix time is
never near it), so each has its own type and mypy refuses one where the other is expected:

* :data:`Monotonic` - seconds of the caller's monotonic clock (``time.monotonic()``): pool
  expiry, cool-downs, rate limits, model-listing TTL. Only differences mean anything.
* :data:`UnixTime` - seconds since the Unix epoch (``time.time()``, possibly corrected by the
  relay's ``Date``): what servers publish (``nonce_expires_at``, v2 offers' ``not_after``, the
  v2 header's timestamp).

Both are ``float`` at run time; :func:`to_monotonic` converts a server's Unix instant into the
caller's monotonic clock, given one reading of each taken at the same moment. The relay's
``Date`` header corrects the client's Unix clock for v2 timestamps
(:func:`relay_clock_offset`).
"""

from __future__ import annotations

import calendar
import email.utils
from typing import Final, NewType

__all__ = [
    "CLOCK_SLACK",
    "Monotonic",
    "UnixTime",
    "http_date",
    "relay_clock_offset",
    "to_monotonic",
]

#: A relay ``Date`` within this many seconds of the local clock leaves v2 timestamps alone (the
#: header has a resolution of one second; the instance accepts +-120 s).
CLOCK_SLACK: Final = 2.0

Monotonic = NewType("Monotonic", float)
UnixTime = NewType("UnixTime", float)


def to_monotonic(instant: UnixTime, *, now: Monotonic, wall: UnixTime) -> Monotonic:
    """``instant`` on the monotonic clock that read ``now`` when the Unix clock read ``wall``."""
    return Monotonic(now + (instant - wall))


def http_date(value: str) -> UnixTime | None:
    """An HTTP ``Date`` value (IMF-fixdate and the obsolete forms; a missing or ``-0000`` zone
    is UTC) as Unix time, or ``None`` when it is not a valid date."""
    parts = email.utils.parsedate_tz(value)
    if parts is None:
        return None
    year, month, day, hour, minute, second = parts[:6]
    if not (
        1 <= year <= 9999
        and 1 <= month <= 12
        and 1 <= day <= calendar.monthrange(year, month)[1]
        and 0 <= hour < 24
        and 0 <= minute < 60
        and 0 <= second < 60
    ):
        return None
    stamp = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return UnixTime(float(stamp - (parts[9] or 0)))


def relay_clock_offset(date: str, wall: UnixTime) -> float | None:
    """Seconds to add to the local Unix clock ``wall`` to agree with the relay's ``Date``:
    0.0 when they agree within :data:`CLOCK_SLACK`, ``None`` when ``date`` is unreadable (keep
    the current correction). ``Date`` is rounded down: its middle second is compared. A relay
    lying about it can only get v2 requests refused as stale."""
    at = http_date(date)
    if at is None:
        return None
    offset = at + 0.5 - wall
    return offset if abs(offset) > CLOCK_SLACK else 0.0
