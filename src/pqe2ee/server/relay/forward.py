"""Forwarding one ``POST /e2e/invoke`` to its instance, and its answer back.

Request and response bodies are streamed through as opaque bytes: never parsed, never buffered
whole, never logged. While the instance works (a non-stream answer can take minutes) the client
is watched: when it hangs up, the instance connection is closed, so the instance cancels the
engine's generation too. If the instance breaks off mid-body, the client's connection is closed
without a clean end (the client's decryptor reports truncation), never made to look complete.

Answers: a 200, or any *sealed* answer (``application/octet-stream``, any status), passes through
unchanged, so the client can open the engine's message. An instance's plaintext error becomes
the real relay's wording; its v2 hint (``{"detail":"e2e_v2:<code>"}``) keeps its text on 409
(replay) and 413 as on 400, nested in ``detail`` as a JSON object (the real relay nests a 400's
JSON as a string, ``{"detail":"{\\"detail\\":...}"}``: clients that read either find the text). An error
body over ``_MAX_ERROR_BODY`` (or broken off) is not quoted at all: never a truncated quote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import httpx2
import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from pqe2ee.errors import ErrorCode
from pqe2ee.protocol._codec import json_decode
from pqe2ee.server._asgi import (
    BodyTooLarge,
    StreamedResponse,
    StreamOutcome,
    iter_body,
    json_response,
    read_bounded,
)
from pqe2ee.server._client import PostTarget
from pqe2ee.server.relay.answers import detail, gone, too_large
from pqe2ee.server.relay.config import RelayConfig
from pqe2ee.server.relay.metrics import RelayMetrics
from pqe2ee.server.relay.registry import InstanceState, Prober

__all__ = ["Forwarder", "Invocation"]

log = logging.getLogger("pqe2ee.relay")

_MAX_ERROR_BODY: Final = 64 * 1024
_V2_HINT: Final = b'"e2e_v2:'  # an instance's v2 refusal: {"detail":"e2e_v2:<code>"}
# A v2-only instance's refusal of a v1 blob: 426 {"detail": ..., "code": "v1_disabled"}.
_V1_DISABLED: Final = b'"v1_disabled"'
_V1_DISABLED_DETAIL: Final = (
    "E2E v1 is disabled on this instance: seal the request with wire profile v2 "
    "(the e2e_v2 key in discovery)"
)


class _Upload(httpx2.AsyncByteStream):
    """The client's request body as the upstream request's stream: passed on chunk by chunk as
    it arrives (bounded by :func:`iter_body`), counted, and ``done`` once it is over."""

    def __init__(self, request: Request, limit: int, metrics: RelayMetrics) -> None:
        self._request = request
        self._limit = limit
        self._metrics = metrics
        self.done = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        try:
            async for chunk in iter_body(self._request, self._limit):
                total += len(chunk)
                yield chunk
        except BodyTooLarge as exc:
            total = exc.received
            raise
        finally:
            self.done.set()
            self._metrics.bytes_in.inc(min(total, self._limit))


class Invocation(StreamedResponse):
    """One accepted invocation as the relay's response: it sends the request to the instance
    and relays the answer as it arrives (no buffering), all under one watch for the client's
    hang-up (which starts once the upload is over: until then the upload reads ``receive``).
    The upstream response is closed whatever happens, so the instance sees a hang-up."""

    def __init__(
        self,
        forwarder: Forwarder,
        inst: InstanceState,
        upstream: httpx2.Request,
        upload: _Upload,
        stream: bool,
    ) -> None:
        super().__init__(200, ())  # status and headers are the instance's, once it answers
        self._forwarder = forwarder
        self._inst = inst
        self.upstream = upstream  # the request to the instance
        self._upload = upload
        self._stream = stream
        self._resp: httpx2.Response | None = None
        self._relaying = False
        self._sent = 0
        self._outcome = StreamOutcome.FAILED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        uploaded = self._upload.done

        async def receive_after_upload() -> Message:
            await uploaded.wait()
            return await receive()

        await super().__call__(scope, receive_after_upload, send)
        if self._outcome is StreamOutcome.CLIENT_GONE and not self.started:
            # hung up before any answer: logged and counted as 499 (nobody reads it)
            await Response(status_code=499)(scope, receive, send)

    async def write(self, send: Send) -> None:
        reply = await self._call_instance()
        if reply is not None:  # the relay's own answer
            self.status_code = reply.status_code
            self.raw_headers = reply.raw_headers
            await self.send_body(send, bytes(reply.body), more=False)
            return
        resp = self._resp
        assert resp is not None
        metrics = self._forwarder.metrics
        metrics.open_streams.inc()
        self._relaying = True
        # The head goes out with the body's first chunk (the instance writes them back to back,
        # yet they often arrive in two reads): together they wake the client once, not twice.
        try:
            async for chunk in resp.aiter_raw():
                if chunk:
                    self._sent += len(chunk)
                    await self.send_body(send, chunk)
        except httpx2.HTTPError as exc:
            log.warning("instance response broke off mid-body (%s)", type(exc).__name__)
            return  # no final chunk: the client must not see a clean end
        await self.send_body(send, b"", more=False)

    def start_due(self) -> bool:
        return self._relaying  # the instance answered: its head goes out whatever follows

    async def _call_instance(self) -> Response | None:
        """Send the request; None when the instance's answer is to be relayed as it is
        (``status_code``/``raw_headers`` set), else the relay's answer."""
        fwd = self._forwarder
        client = fwd.client
        assert client is not None
        cfg = fwd.config
        started = time.perf_counter()
        try:
            resp = await client.send(self.upstream, stream=True)
        except BodyTooLarge:
            return too_large(cfg.max_body)
        except ClientDisconnect:
            return detail(400, "Client disconnected")
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            fwd.prober.mark_down(self._inst, "connection refused or timed out", cfg.gone_for)
            return gone()
        except httpx2.TimeoutException:
            return detail(504, "Instance timed out")
        except httpx2.HTTPError as exc:
            log.warning("instance %s: request failed (%s)", self._inst.url, type(exc).__name__)
            return detail(502, "Instance connection failed")
        self._resp = resp
        self._upload.done.set()  # the instance answered: whatever is left of the upload is moot
        fwd.metrics.invoke_timer(self._stream).observe(time.perf_counter() - started)
        media, passed = _answer_headers(resp)
        if resp.status_code == 200 or media == "application/octet-stream":
            self.status_code = resp.status_code
            self.raw_headers = passed
            return None
        return await _plaintext_error(resp, media)

    async def finish(self, outcome: StreamOutcome) -> None:
        self._outcome = outcome
        if self._relaying:
            metrics = self._forwarder.metrics
            metrics.open_streams.dec()
            metrics.bytes_out.inc(self._sent)
        if self._resp is not None:
            await self._resp.aclose()


_PASSED: Final[tuple[bytes, ...]] = (b"content-type", b"content-length", b"content-encoding")


def _answer_headers(resp: httpx2.Response) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The instance's media type, and the headers passed on with its answer (repeated ones
    joined, as ``httpx2.Headers`` reads them)."""
    found: dict[bytes, bytes] = {}
    for name, value in resp.headers.raw:
        key = name.lower()
        if key in _PASSED:
            found[key] = found[key] + b", " + value if key in found else value
    passed = [(key, found[key]) for key in _PASSED if key in found]
    passed.append((b"cache-control", b"no-store"))
    content_type = found.get(b"content-type", b"").decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower(), passed


async def _error_text(resp: httpx2.Response) -> bytes | None:
    """An instance's (plaintext) error body, or None when it is too long or broke off."""
    try:
        return await read_bounded(resp.aiter_raw(), _MAX_ERROR_BODY)
    except (BodyTooLarge, httpx2.HTTPError):
        return None
    finally:
        await resp.aclose()


def _instance_detail(text: bytes) -> Any:
    """An instance's JSON error as the relay's ``detail``: the object itself (nested once, not
    re-encoded into a string as Chutes' relay does), or the text when it is not an object."""
    try:
        obj = json_decode(text)
    except msgspec.DecodeError:
        obj = None
    return obj if isinstance(obj, dict) else text.decode("utf-8", "replace")


async def _plaintext_error(resp: httpx2.Response, media: str) -> Response:
    """The relay's answer to an instance's plaintext (unsealed, non-200) answer."""
    status = resp.status_code
    text = await _error_text(resp)
    if status == 403:
        return detail(403, "Instance returned status 403")
    if status == 429:
        return detail(429, "Instance is at maximum capacity, try again later")
    if status == 426:
        if text is not None and media == "application/json" and _V1_DISABLED in text:
            # A pqe2ee v2-only instance: said as it is (spec/v2.md §8.2), not "try another".
            return json_response(
                {"detail": _V1_DISABLED_DETAIL, "code": ErrorCode.V1_DISABLED.value},
                426,
                {"upgrade": "pqe2ee-v2"},
            )
        return detail(502, "Instance requires key exchange, try a different instance")
    if text is not None and media == "application/json":
        if status == 400:
            return detail(400, _instance_detail(text))
        if status in (409, 413) and _V2_HINT in text:
            return detail(status, _instance_detail(text))
    return detail(status, f"Instance returned status {status}")


class Forwarder:
    """Builds the upstream request of each accepted invocation; ``client`` is set for the
    app's lifetime."""

    def __init__(self, config: RelayConfig, metrics: RelayMetrics, prober: Prober) -> None:
        self.config = config
        self.metrics = metrics
        self.prober = prober
        self._client: httpx2.AsyncClient | None = None
        self._targets: dict[str, PostTarget] = {}  # instance URL -> its /e2e/invoke target

    @property
    def client(self) -> httpx2.AsyncClient | None:
        return self._client

    @client.setter
    def client(self, client: httpx2.AsyncClient | None) -> None:
        self._client = client
        self._targets.clear()

    def _target(self, client: httpx2.AsyncClient, base: str) -> PostTarget:
        target = self._targets.get(base)
        if target is None:
            target = self._targets[base] = PostTarget.of(client, base + "/e2e/invoke")
        return target

    def forward(self, request: Request, inst: InstanceState, length: int | None) -> Response:
        """The response that forwards ``request`` to ``inst`` and relays its answer."""
        client = self.client
        assert client is not None and inst.instance_id is not None
        headers = request.headers
        stream = headers.get("x-e2e-stream", "false").strip().lower() == "true"
        # The headers client.build_request(..., content=<the upload>) would add after its own.
        own = [
            (b"content-type", b"application/octet-stream"),
            (b"x-e2e-path", headers.get("x-e2e-path", "/").encode("latin-1")),
            (b"x-e2e-stream", b"true" if stream else b"false"),
            (b"x-chute-id", headers["x-chute-id"].encode("latin-1")),
            (b"x-instance-id", inst.instance_id.encode("ascii")),
            (b"content-length", str(length).encode())
            if length is not None
            else (b"Transfer-Encoding", b"chunked"),
        ]
        upload = _Upload(request, self.config.max_body, self.metrics)
        upstream = self._target(client, inst.url).request(client, headers=own, stream=upload)
        return Invocation(self, inst, upstream, upload, stream)
