"""The request orchestration every transport shares, behind a tiny network port.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin
(``_sync/_engine.py``). No HTTP library is imported here: a transport hands the engine an
:class:`AsyncPort` that can send one request and return an :class:`AsyncPortResponse`
(status, raw headers, a lazy body, close), and gets back an :data:`Outcome`:

* :class:`Opened` - the decrypted body of a non-stream answer (a 200, or an engine error sealed
  by the instance), with the engine's status;
* :class:`Streaming` - a 200 stream: an :class:`AsyncPlainStream` that yields the engine's own
  SSE bytes (or its events) and raises typed pqe2ee errors on any fault;
* :class:`RelayAnswer` - a plaintext relay answer that is not retried and not an error the
  engine raises itself (e.g. 401, 500), already read, with its classification.

What the engine does, for one request: resolve model -> chute (``/v1/models``, cached; a UUID is
a chute id), decide the protocol version for the chute (spec/v2.md §8: a
:class:`~pqe2ee.protocol.v2.Negotiator` applies the transport's policy to the discovered
instances; a strict client refuses v1 with ``downgrade_refused`` and a pinned chute without v2
raises ``downgrade_suspected``, both before any nonce is spent), lease a nonce of an eligible
instance (one discovery per chute at a time, within the client's discovery rate limit,
prefetching beside the request when the pool runs low), seal the body to the instance with a
fresh one-use response key (v1: ML-KEM-768 envelope; v2: X-Wing HPKE with the context
header), ``POST /e2e/invoke``, classify the answer and retry a refused nonce / gone, busy or
key-exchange instance on a fresh lease up to ``max_attempts`` in all. Every attempt is a new
request (new nonce, new seal, new response key; for v2 also a new timestamp and request id).

Opening answers is protocol work, done by the sans-IO
:class:`~pqe2ee.protocol.response.ResponseDecoder` (this module reads the bytes and hands them
over; it keeps only I/O, the retry loop and the hand-off). v2 answers are opened with their
authenticated status: a single response becomes
:class:`Opened` with the engine's status, body and content type (an upstream failure reported
in END becomes a 502-class error body); a stream is read up to its authenticated HEAD before it
is handed over (a non-2xx HEAD is read whole and handed over as :class:`Opened`). Plaintext v2
refusals of the instance (``{"detail":"e2e_v2:<code>"}``) are typed ``RelayError`` s with the
hint's code: ``unknown_key`` (after a key rotation; the pool is dropped so the retry
rediscovers) and ``stale`` are retried once each; the others (``replay``,
``context_mismatch``, ``decrypt_failed``, ...) are raised at once.

Time: ``clock`` is monotonic (:data:`~pqe2ee.protocol.clocks.Monotonic`: pools, rate limits,
deadlines), ``wall_clock`` Unix time (:data:`~pqe2ee.protocol.clocks.UnixTime`: v2 timestamps,
offer expiry, and placing discovery's ``nonce_expires_at`` on the pool clock). Locks: the
protocol state is lock-free; the engine holds one ``threading.Lock`` (shared by every engine
using the same negotiator) around each call into it, never across an await, so the blocking
twin can serve many threads.

Network exceptions are the port's own and pass through unchanged, except mid-stream, where the
port's ``lost_errors`` (other than ``timeout_errors``) become ``StreamError(connection_lost)``.
Each transport maps exceptions to its library's types at its own boundary.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.errors import (
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
)
from pqe2ee.protocol.client import (
    INVOKE_PATH,
    MODELS_PATH,
    RETRYABLE,
    RETRYABLE_ONCE_V2,
    ClientState,
    Negotiated,
    classify_discovery_error,
    classify_invoke_error,
    classify_v2_hint,
    discovery_path,
    invoke_headers,
    is_sealed_error,
    may_be_sealed,
)
from pqe2ee.protocol.clocks import Monotonic, UnixTime, relay_clock_offset
from pqe2ee.protocol.discovery import Lease, looks_like_uuid
from pqe2ee.protocol.response import Opened, open_answer
from pqe2ee.protocol.v1.envelope import seal_request
from pqe2ee.protocol.v2.negotiation import Negotiator
from pqe2ee.protocol.v2.request import ResponseSecrets, seal_request_v2
from pqe2ee.transports._async._attest import AsyncAttestor
from pqe2ee.transports._async._bounded import AsyncBoundedPort
from pqe2ee.transports._async._stream import AsyncPlainStream, AsyncPort, AsyncPortResponse
from pqe2ee.transports._common import (
    MAX_BLOB,
    MAX_DOC,
    MAX_ERROR_BODY,
    RawHeaders,
    RetriesExhausted,
    Settings,
    header_value,
)
from pqe2ee.transports._keypool import KeyPool, XWingKeyPool
from pqe2ee.transports._primitives import AsyncBackground, AsyncLock, async_sleep
from pqe2ee.transports._usage import UsageFilter

__all__ = [
    "AsyncEngine",
    "AsyncPlainStream",
    "AsyncPort",
    "AsyncPortResponse",
    "Opened",
    "Outcome",
    "RelayAnswer",
    "Streaming",
    "body_refused",
    "plaintext_refused",
]

log = logging.getLogger("pqe2ee.transports")


_NEGOTIATOR_LOCKS: weakref.WeakKeyDictionary[Negotiator, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_REGISTRY_LOCK: Final = threading.Lock()


def _lock_for(negotiator: Negotiator) -> threading.Lock:
    """The one lock of every engine using ``negotiator``."""
    with _REGISTRY_LOCK:
        lock = _NEGOTIATOR_LOCKS.get(negotiator)
        if lock is None:
            lock = _NEGOTIATOR_LOCKS[negotiator] = threading.Lock()
        return lock


# -- outcomes --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Streaming:
    """A 200 stream: read it (and close it) through ``stream``."""

    stream: AsyncPlainStream


@dataclass(frozen=True, slots=True)
class RelayAnswer:
    """A plaintext relay answer handed over as it was (already read): ``error`` says what it
    means (``relay_error`` for statuses the engine does not know)."""

    status: int
    headers: RawHeaders
    body: bytes
    error: RelayError


Outcome = Opened | Streaming | RelayAnswer
#: The caller's body already decoded (``e2e_request``), or None: decoded when sealing.
_Body = dict[str, Any] | None


def plaintext_refused(method: str, path: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"strict mode: refusing to send {method} {path} in plaintext",
        code=ErrorCode.PLAINTEXT_REFUSED,
    )


def body_refused(method: str, path: str) -> LocalProtocolError:
    """A request with a body for a path that is not an E2EE path: its body may hold a prompt
    (the Responses API, embeddings, Anthropic Messages...), so it is not sent in plaintext
    either, strict or not."""
    return LocalProtocolError(
        f"refusing to send {method} {path[:100]} in plaintext: it has a body and is not one of "
        "the E2EE paths (e2e_paths; other API dialects: pqe2ee proxy)",
        code=ErrorCode.PLAINTEXT_REFUSED,
    )


# -- the engine ------------------------------------------------------------------------------------


class AsyncEngine:
    """Model map, nonce pools, key pools, version negotiation and the invoke loop of one
    transport (thread-safe for the sync twin; task-safe for this one).

    ``negotiator`` keeps the per-chute v2 pins; pass one to share pins between transports
    (the proxy shares one between its per-key transports). ``wall_clock`` (Unix seconds) dates
    v2 requests and judges offer expiry and pins; it is corrected by the relay's ``Date``
    when the two disagree by more than :data:`~pqe2ee.protocol.clocks.CLOCK_SLACK`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        negotiator: Negotiator | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = ClientState(settings.limits)
        self.keys: KeyPool = settings.new_key_pool()
        self.keys_v2: XWingKeyPool | None = settings.new_xwing_key_pool()
        self.negotiator = negotiator if negotiator is not None else Negotiator(settings.policy)
        self.clock_offset = 0.0  # seconds to add to wall_clock (from the relay's Date)
        # Around every call into the (lock-free) client state and negotiator, the dict of
        # per-chute locks and the warnings: one lock per negotiator, so that engines sharing a
        # negotiator (the proxy's per-key transports) serialise on the same lock. Never held
        # across an await.
        self._guard = _lock_for(self.negotiator)
        self._chute_locks: dict[str, AsyncLock] = {}
        self._warned: set[tuple[str, str]] = set()
        self._decided: dict[str, Negotiated] = {}  # the decision last looked at, per chute
        self._models_lock = AsyncLock()
        self._background = AsyncBackground()  # prefetches in flight
        #: ``POST`` here, with the caller's timeouts (control=False), not the engine's.
        self._invoke_url = settings.api_base + INVOKE_PATH
        attest = settings.options.attestation
        self.attestor = AsyncAttestor(attest, settings.api_base) if attest.mode != "off" else None

    def close_keys(self) -> None:
        """Stop the key pools' threads and wipe the keys still pooled; cancel the prefetches
        in flight (no I/O)."""
        self._background.cancel()
        self.keys.close()
        if self.keys_v2 is not None:
            self.keys_v2.close()

    def now(self) -> Monotonic:
        """The engine's monotonic clock (pools, cool-downs, rate limits, deadlines)."""
        return Monotonic(self.clock())

    def wall(self) -> UnixTime:
        """Unix seconds, corrected by the relay's clock when it disagrees."""
        return UnixTime(self.wall_clock() + self.clock_offset)

    # -- invoke ---------------------------------------------------------------------------------

    async def invoke(
        self,
        port: AsyncPort,
        *,
        path: str,
        body: bytes,
        model: str,
        auth: str | None,
        decoded: dict[str, Any] | None = None,
    ) -> Outcome:
        """Send ``body`` for ``path`` end-to-end encrypted, within ``deadline`` (_bounded).
        ``decoded``: ``body`` already decoded (``e2e_request``), so it is not parsed again."""
        # One frame for the whole request: the steps below run inside the deadline's block.
        # The deadline is the port the steps send through (one object per request).
        s = self.settings
        bounded = AsyncBoundedPort(port, s.options.deadline, self.clock)
        with bounded:
            started = Monotonic(bounded.start)  # (the engine's clock: one read for both)
            deadline = started + s.timeout  # (the engine's clock, a float: the steps' bound)
            with self._guard:
                chute = self.state.fresh_chute(model, started)  # (a UUID: itself, a chute id)
            if chute is None:  # a listing refresh is due (or the model is not in it)
                chute = await self._resolve_chute(bounded, model, auth, started)
            last: RelayError | None = None
            retried_once: set[ErrorCode] = set()
            remapped = False
            for attempt in range(1, s.max_attempts + 1):
                try:
                    lease, negotiated = await self._lease(bounded, chute, auth, deadline)
                except RelayError as exc:
                    if exc.code is ErrorCode.MODEL_NOT_FOUND and not remapped:
                        # Discovery does not know the cached chute id ("Chute not found"): the
                        # model may have moved. Re-read the listing once and retry if it changed.
                        remapped = True
                        fresh = await self._resolve_chute(bounded, model, auth, self.now())
                        if fresh != chute:
                            chute, last = fresh, exc
                            continue
                    if self.attestor is not None:
                        self.attestor.no_instances(chute, exc)  # left: only instances that failed
                    if last is not None and exc.code is ErrorCode.NO_INSTANCES:
                        raise RetriesExhausted(last, attempt - 1) from last
                    raise
                if self.attestor is not None:  # before anything is sealed (pqe2ee.attest)
                    found = await self.attestor.admit(
                        self, bounded, chute, (lease, negotiated), auth, deadline
                    )
                    lease, negotiated = found
                if negotiated.decision.version == 2:  # (.version: a property frame)
                    outcome = await self._invoke_v2(
                        bounded, lease, negotiated, path, body, auth, decoded
                    )
                else:
                    outcome = await self._invoke_v1(bounded, lease, path, body, auth, decoded)
                if not isinstance(outcome, RelayAnswer):
                    if isinstance(outcome, Streaming):
                        outcome.stream.usage_filter = UsageFilter.for_request(body, decoded)
                    return outcome
                error = outcome.error
                with self._guard:
                    self.state.report(lease, error, self.now())
                retry = error.code in RETRYABLE
                if error.code in RETRYABLE_ONCE_V2 and error.code not in retried_once:
                    retried_once.add(error.code)
                    retry = True
                    if error.code is ErrorCode.STALE:
                        self._note_date(outcome.headers)
                if retry:
                    last = error
                    log.debug(
                        "relay answered %s (%s); attempt %d",
                        outcome.status,
                        error.code.value,
                        attempt,
                    )
                    continue
                if error.code is not ErrorCode.RELAY_ERROR:
                    raise error  # path_forbidden, a v2 refusal, or a retry-once code seen twice
                if negotiated.version == 2:
                    # Under v2 the engine's answers (errors included) are authenticated and always
                    # arrive in a 200; any other status is the relay's own, unauthenticated words.
                    # Raise it as such rather than let it pass for the engine's error.
                    raise error
                return outcome
            assert last is not None
            raise RetriesExhausted(last, s.max_attempts) from last

    def _plain(
        self,
        port: AsyncBoundedPort,
        upstream: AsyncPortResponse,
        key: KEMPrivateKey | ResponseSecrets,
    ) -> AsyncPlainStream:
        """The decrypting stream over a 200 streamed answer."""
        return AsyncPlainStream(
            upstream,
            key,
            self.settings,
            lost_errors=port.port.lost_errors,
            timeout_errors=port.port.timeout_errors,
            reads=port.reads(),
        )

    async def _invoke_v1(
        self,
        port: AsyncBoundedPort,
        lease: Lease,
        path: str,
        body: bytes,
        auth: str | None,
        decoded: dict[str, Any] | None,
    ) -> Outcome:
        s = self.settings
        key = self.keys.take()
        try:
            sealed = seal_request(
                body, lease.public_key, response_key=key, kem=s.kem, aead=s.aead, decoded=decoded
            )
            headers = invoke_headers(auth, lease, sealed, path)
            upstream = await port.send(
                "POST", self._invoke_url, headers, sealed.blob, control=False
            )
        except BaseException:
            key.wipe()
            raise
        status = upstream.status
        if status == 200 and sealed.stream:
            return Streaming(self._plain(port, upstream, key))
        try:
            if status == 200:  # (its content type says nothing: a 200 is always sealed)
                return open_answer(key, await port.aread(upstream, MAX_BLOB), aead=s.aead)
            content_type = header_value(upstream.headers, b"content-type")
            limit = MAX_BLOB if may_be_sealed(status, content_type) else MAX_ERROR_BODY
            data = await port.aread(upstream, limit)
            if is_sealed_error(status, content_type, data):
                return open_answer(key, data, aead=s.aead, status=status)
        finally:
            key.wipe()
        return RelayAnswer(status, upstream.headers, data, classify_invoke_error(status, data))

    async def _invoke_v2(
        self,
        port: AsyncBoundedPort,
        lease: Lease,
        negotiated: Negotiated,
        path: str,
        body: bytes,
        auth: str | None,
        decoded: dict[str, Any] | None,
    ) -> Outcome:
        s = self.settings
        assert s.xwing is not None and self.keys_v2 is not None  # a v2 decision needs prefer_v2
        offer = negotiated.offers[lease.instance_id]
        key = self.keys_v2.take()
        try:
            sealed = seal_request_v2(
                body,
                offer.public_key,
                chute_id=lease.chute_id,
                instance_id=lease.instance_id,
                relay_nonce=lease.nonce,
                path=path,
                now_ms=int(self.wall() * 1000),
                xwing=s.xwing,
                aead=s.aead,
                response_key=key,
                decoded=decoded,
                key_hash=offer.pk_hash,
            )
            headers = sealed.invoke_headers(auth)
            upstream = await port.send(
                "POST", self._invoke_url, headers, sealed.blob, control=False
            )
        except BaseException:
            key.wipe()
            raise
        status = upstream.status
        if status == 200 and sealed.stream:
            stream = self._plain(port, upstream, sealed.secrets)
            try:
                head = await stream._head()
            except BaseException:
                await stream.aclose()
                raise
            if head is None or 200 <= head.status < 300:
                return Streaming(stream)
            return await stream._rest()  # the engine's error answer, authenticated
        try:
            data = await port.aread(upstream, MAX_BLOB if status == 200 else MAX_ERROR_BODY)
            if status == 200:
                return open_answer(sealed.secrets, data, aead=s.aead)
        finally:
            key.wipe()
        error = classify_v2_hint(status, data) or classify_invoke_error(status, data)
        return RelayAnswer(status, upstream.headers, data, error)

    # -- models ---------------------------------------------------------------------------------

    async def _resolve_chute(
        self,
        port: AsyncBoundedPort,
        model: str,
        auth: str | None,
        now: Monotonic,
    ) -> str:
        """The chute for ``model`` when the listing is due for a refresh (``invoke`` looks up
        a fresh answer itself), or a forced one (a cached chute discovery did not know)."""
        with self._guard:
            chute = self.state.resolve_chute(model, now)  # (the cached answer, even if stale)
        if chute == model and looks_like_uuid(model):
            return model  # never looked up in a listing (nor refreshed for)
        generation = self.state.models_generation
        forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.port.network_errors)
        async with self._models_lock:
            # Whoever missed while another refresh ran shares that refresh.
            if self.state.models_generation == generation:
                try:
                    await self._fetch_models(port, auth)
                except forgiven:
                    if chute is None:
                        raise
                    log.debug("model listing refresh failed; using the cached mapping")
        with self._guard:
            chute = self.state.resolve_chute(model, self.now())
        if chute is None:
            raise RelayError(
                f"model {model[:100]!r} is not listed at {self.settings.models_base}{MODELS_PATH}",
                code=ErrorCode.MODEL_NOT_FOUND,
                status=404,
            )
        return chute

    async def _fetch_models(self, port: AsyncBoundedPort, auth: str | None) -> None:
        status, _, data = await self._get(port, self.settings.models_base + MODELS_PATH, auth)
        if status != 200:
            raise RelayError(
                f"model listing answered {status}", code=ErrorCode.DISCOVERY_FAILED, status=status
            )
        with self._guard:
            self.state.update_models(data, self.now())
        if self.attestor is not None:  # chutes listed as confidential compute must attest
            self.attestor.note_listing(data)

    # -- leases and discovery -------------------------------------------------------------------

    def drop(self, lease: Lease) -> None:
        """Take ``lease``'s instance out of the pool (it failed attestation)."""
        gone = RelayError("instance failed attestation", code=ErrorCode.INSTANCE_GONE)
        with self._guard:
            self.state.report(lease, gone, self.now())

    def _chute_lock(self, chute: str) -> AsyncLock:
        with self._guard:
            lock = self._chute_locks.get(chute)
            if lock is None:
                lock = self._chute_locks[chute] = AsyncLock()
            return lock

    async def _lease(
        self, port: AsyncBoundedPort, chute: str, auth: str | None, deadline: float
    ) -> tuple[Lease, Negotiated]:
        found, refresh = self._try_lease(chute, Monotonic(self.clock()))  # (now(), inline)
        if found is not None:
            if refresh and not self._chute_lock(chute).locked():
                # Off the request's path: the discovery runs beside it (asyncio: a task; a
                # thread for the blocking twin; trio: inline), held to a deadline of its own.
                own = port.rebound(self.settings.options.deadline)
                await self._background.start(self._prefetch, own, chute, auth)
            return found
        async with self._chute_lock(chute):
            # One discovery per chute at a time; whoever waited uses its result.
            found, _ = self._try_lease(chute, self.now())
            with self._guard:  # only busy instances left: wait for them (discovery cannot help)
                wait = self.state.busy_wait(chute, self.now())
            if found is None and 0 < wait <= deadline - self.now():
                await async_sleep(wait)
                found, _ = self._try_lease(chute, self.now())
            if found is None:
                await self._discover(port, chute, auth, deadline)
                found, _ = self._try_lease(chute, self.now())
        if found is None:
            raise RelayError(
                "no usable instance (all gone, busy or out of nonces)",
                code=ErrorCode.NO_INSTANCES,
            )
        return found

    def _try_lease(
        self, chute: str, now: Monotonic
    ) -> tuple[tuple[Lease, Negotiated] | None, bool]:
        """A lease of an instance the version decision allows (the decision may raise
        ``downgrade_refused`` / ``downgrade_suspected``: no nonce is taken then), and whether
        the pool wants a prefetch: one trip through the lock. The warnings a decision calls for
        are looked at once per decision (the state caches it until the next discovery)."""
        fresh: list[str] = []
        with self._guard:
            found = self.state.negotiated_lease(chute, self.negotiator, now, self.wall)
            if found is None:
                return None, False
            lease, negotiated, refresh = found
            if self._decided.get(chute) is not negotiated:
                if len(self._decided) >= 10_000:
                    self._decided.clear()
                self._decided[chute] = negotiated
                fresh = self._fresh_warnings(chute, negotiated)
        if fresh:
            self._warn(chute, negotiated, fresh)
        return (lease, negotiated), refresh

    def _fresh_warnings(self, chute: str, negotiated: Negotiated) -> list[str]:
        """What to warn about for this decision that was not yet said for the chute (under
        the guard)."""
        decision = negotiated.decision
        kinds = []
        if decision.downgraded:
            kinds.append("v1")
        if decision.invalid_offers:
            kinds.append("invalid")
        fresh = [k for k in kinds if (chute, k) not in self._warned]
        if len(self._warned) >= 10_000:
            self._warned.clear()
        self._warned.update((chute, k) for k in fresh)
        return fresh

    def _warn(self, chute: str, negotiated: Negotiated, fresh: list[str]) -> None:
        """Log, once per chute, that it is spoken to in v1 although v2 is preferred, or that
        some of its instances published an invalid v2 offer."""
        decision = negotiated.decision
        if "invalid" in fresh:
            log.warning(
                "chute %s: %d instance(s) published an invalid e2e_v2 offer (ignored)",
                chute,
                decision.invalid_offers,
            )
        if "v1" in fresh:
            log.warning("chute %s offers no v2: using v1 (min_version=2 would refuse)", chute)

    async def _prefetch(self, port: AsyncBoundedPort, chute: str, auth: str | None) -> None:
        """Refresh a pool that runs low or nears expiry - only if no discovery is in flight
        and the rate limit allows one right now (a prefetch never waits). Runs in the
        background (:meth:`_lease`): a relay or network failure is logged at debug here
        (anything else reaches the background runner, which warns)."""
        lock = self._chute_lock(chute)
        if not lock.try_acquire():
            return
        try:
            now = self.now()
            with self._guard:
                if not self.state.needs_discovery(chute, now):
                    return
                if self.state.try_record_discovery(now) > 0:
                    return
            forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.port.network_errors)
            try:
                with port:  # (a block of its own deadline: its sends and reads are held to it)
                    await self._discover_now(port, chute, auth, now)
            except forgiven as exc:
                log.debug("discovery prefetch failed: %s", type(exc).__name__)
        finally:
            lock.release()

    async def _discover(
        self, port: AsyncBoundedPort, chute: str, auth: str | None, deadline: float
    ) -> None:
        while True:
            now = self.now()
            with self._guard:
                wait = self.state.try_record_discovery(now)
            if wait <= 0:
                break
            if now + wait > deadline:
                lim = self.settings.limits
                raise RelayError(
                    f"discovery limit of {lim.discovery_per_window} per "
                    f"{lim.discovery_window:g}s reached; the next slot is {wait:.1f}s away, "
                    f"past the {self.settings.timeout:g}s timeout",
                    code=ErrorCode.DISCOVERY_RATE_LIMITED,
                )
            await async_sleep(wait)
        await self._discover_now(port, chute, auth, now)

    async def _discover_now(
        self, port: AsyncBoundedPort, chute: str, auth: str | None, recorded_at: Monotonic
    ) -> None:
        sent_at = self.now()
        status, headers, data = await self._get(
            port, self.settings.api_base + discovery_path(chute), auth
        )
        if status != 200:
            if status >= 500:  # no nonces came: off the rate budget, and back off briefly
                with self._guard:
                    self.state.discovery_failed(recorded_at, self.now())
            raise classify_discovery_error(status, data)
        self._note_date(headers)
        # nonce_expires_at is the server's Unix time: place it on the monotonic pool clock by
        # the Unix time at sent_at (corrected by the relay's Date, just noted).
        sent_wall = UnixTime(self.wall() - (self.now() - sent_at))
        with self._guard:
            usable = self.state.load_discovery(chute, data, sent_at, sent_wall)
        if usable == 0:
            raise RelayError("discovery listed no usable instance", code=ErrorCode.NO_INSTANCES)

    def _note_date(self, headers: RawHeaders) -> None:
        """Correct the v2 clock by the relay's ``Date`` when they disagree by more than
        :data:`~pqe2ee.protocol.clocks.CLOCK_SLACK` (a relay lying about it can only get
        requests refused as stale)."""
        value = header_value(headers, b"date")
        if value is None:
            return
        offset = relay_clock_offset(value, UnixTime(self.wall_clock()))
        if offset is not None:
            self.clock_offset = offset

    async def _get(
        self, port: AsyncBoundedPort, url: str, auth: str | None
    ) -> tuple[int, RawHeaders, bytes]:
        headers = [("Accept", "application/json")]
        if auth:
            headers.append(("Authorization", f"Bearer {auth}"))
        response = await port.send("GET", url, headers, b"", control=True)
        status = response.status
        data = await port.aread(response, MAX_DOC if status == 200 else MAX_ERROR_BODY)
        return status, response.headers, data
