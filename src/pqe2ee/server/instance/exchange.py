"""One request's bookkeeping in the instance: its log line, its concurrency slot, and the early
answers that end it.

* :class:`RequestLog` is the single log line of a request: method, route, status, byte counts,
  duration and ids - never bodies, keys or header values other than ids.
* :class:`Concurrency` counts requests in flight; a :class:`Slot` is one unit of it, released
  exactly once (by the handler, or by the streamed answer that took it over).
* :class:`Reject` ends request handling with a ready answer; :class:`EngineFailure` says the
  engine could not be used after the request opened (v1 answers it in plaintext, v2 seals it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import anyio.to_thread
from starlette.responses import Response

from pqe2ee.errors import ErrorCode, LimitExceeded, PQE2EEError
from pqe2ee.protocol.v2 import UpstreamError
from pqe2ee.server._asgi import json_response

__all__ = [
    "OPEN_ON_LOOP_MAX",
    "SSE_HEADERS",
    "THREAD_THRESHOLD",
    "Concurrency",
    "EngineFailure",
    "Reject",
    "RequestLog",
    "Slot",
    "error_response",
    "logger",
    "off_loop_if_big",
    "open_off_loop_if_big",
    "timed_out",
    "unreachable",
]

logger = logging.getLogger("pqe2ee.instance")

THREAD_THRESHOLD: Final = 256 * 1024  # seal bigger bodies off the event loop
# A sealed request is gzip inside: ~1 KiB can inflate to ~1 MiB (deflate tops out near 1032:1),
# a 71 KB bomb to the whole max_plaintext. So a request is opened on the event loop only when
# its blob is at most this many bytes AND its plaintext inflates to at most this many (the first
# try stops there); anything bigger is opened (again) in a worker thread with the full limit.
OPEN_ON_LOOP_MAX: Final = 64 * 1024
SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

T = TypeVar("T")


def error_response(
    status: int, detail: str, code: str | None = None, *, close: bool = False
) -> Response:
    """The instance's plaintext refusal: ``{"detail": ..., "code": ...}``."""
    body: dict[str, str] = {"detail": detail}
    if code is not None:
        body["code"] = code
    return json_response(body, status, {"connection": "close"} if close else None)


class Reject(Exception):
    """Ends request handling early with ``response``; ``code`` goes into the log line."""

    def __init__(self, response: Response, code: str) -> None:
        super().__init__(code)
        self.response = response
        self.code = code

    @classmethod
    def error(cls, status: int, detail: str, code: str, *, close: bool = False) -> Reject:
        """A :func:`error_response` refusal."""
        return cls(error_response(status, detail, code, close=close), code)

    @classmethod
    def encryption_failed(cls, status: int, exc: PQE2EEError) -> Reject:
        return cls.error(status, "E2E encryption failed", exc.code.value)


class EngineFailure(Exception):
    """The engine could not be used after the request opened. v1 answers it in plaintext
    (:meth:`reject`); v2 seals it into the response (HEAD status + END error)."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.detail = detail
        self.code = code

    def reject(self) -> Reject:
        return Reject.error(self.status, self.detail, self.code)

    def upstream_error(self) -> UpstreamError:
        return UpstreamError(self.code, self.detail, self.status)


def timed_out() -> EngineFailure:
    return EngineFailure(504, "Upstream engine timed out", ErrorCode.UPSTREAM_TIMEOUT.value)


def unreachable(detail: str) -> EngineFailure:
    return EngineFailure(502, detail, ErrorCode.UPSTREAM_ERROR.value)


async def off_loop_if_big(fn: Callable[[], T], size: int) -> T:
    """``fn()``, in a worker thread when it works on more than ``THREAD_THRESHOLD`` bytes."""
    if size > THREAD_THRESHOLD:
        return await anyio.to_thread.run_sync(fn)
    return fn()


async def open_off_loop_if_big(
    open_: Callable[[int], T], size: int, limit: int, *, always: bool = False
) -> T:
    """``open_(bound)`` for a ``size``-byte blob whose plaintext may reach ``limit`` bytes.

    A blob of at most ``OPEN_ON_LOOP_MAX`` bytes is opened on the event loop with the plaintext
    bounded by ``OPEN_ON_LOOP_MAX`` too (a worker thread costs ~50 us of CPU per request, more
    than opening a typical request); when that bound is what refused it (``LimitExceeded``), or
    for a bigger blob, or ``always`` (the opener may block), it is opened in a worker thread with
    ``limit``. ``open_`` must have no lasting effect before it has checked the bound.
    """
    if not always and size <= OPEN_ON_LOOP_MAX:
        try:
            return open_(min(limit, OPEN_ON_LOOP_MAX))
        except LimitExceeded:
            if limit <= OPEN_ON_LOOP_MAX:
                raise
    return await anyio.to_thread.run_sync(open_, limit)


@dataclass(slots=True)
class RequestLog:
    """What the one log line of a request says. No bodies, no header values other than ids."""

    method: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    path: str = "-"
    stream: bool | None = None
    chute: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_status: int | None = None
    proto: str = "-"

    def emit(self, status: int, code: str | None = None, level: int = logging.INFO) -> None:
        """The request's line; a failure (our 5xx, or the engine's) is raised to WARNING."""
        if level == logging.INFO and (status >= 500 or (self.upstream_status or 0) >= 500):
            level = logging.WARNING
        if not logger.isEnabledFor(level):
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        logger.log(
            level,
            "%s %s proto=%s path=%s stream=%s chute=%s status=%d upstream=%s in=%d out=%d "
            "ms=%.1f code=%s",
            self.method,
            self.route,
            self.proto,
            self.path,
            "-" if self.stream is None else str(self.stream).lower(),
            self.chute,
            status,
            "-" if self.upstream_status is None else self.upstream_status,
            self.bytes_in,
            self.bytes_out,
            ms,
            code or "-",
        )


class Concurrency:
    """How many requests are in flight, against ``limit``."""

    __slots__ = ("inflight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0

    @property
    def full(self) -> bool:
        return self.inflight >= self.limit

    def acquire(self) -> Slot:
        return Slot(self)


class Slot:
    """One unit of the concurrency budget; ``release`` is idempotent."""

    __slots__ = ("_budget", "_held")

    def __init__(self, budget: Concurrency) -> None:
        self._budget = budget
        self._held = True
        budget.inflight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._budget.inflight -= 1
