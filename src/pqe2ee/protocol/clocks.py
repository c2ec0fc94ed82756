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
caller's monotonic clock, given one reading of each taken at the same moment.
"""

from __future__ import annotations

from typing import NewType

__all__ = ["Monotonic", "UnixTime", "to_monotonic"]

Monotonic = NewType("Monotonic", float)
UnixTime = NewType("UnixTime", float)


def to_monotonic(instant: UnixTime, *, now: Monotonic, wall: UnixTime) -> Monotonic:
    """``instant`` on the monotonic clock that read ``now`` when the Unix clock read ``wall``."""
    return Monotonic(now + (instant - wall))
