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
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import anyio
import httpx2
import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pqe2ee.errors import ErrorCode
from pqe2ee.protocol._codec import json_decode
from pqe2ee.server._asgi import (
    BodyTooLarge,
    StreamedResponse,
    StreamOutcome,
    iter_body,
    json_response,
    read_bounded,
    watch_disconnect,
)
from pqe2ee.server.relay.answers import detail, gone, too_large
from pqe2ee.server.relay.config import RelayConfig
from pqe2ee.server.relay.metrics import RelayMetrics
from pqe2ee.server.relay.registry import InstanceState, Prober

__all__ = ["ForwardedResponse", "Forwarder"]

log = logging.getLogger("pqe2ee.relay")

_MAX_ERROR_BODY: Final = 64 * 1024
_V2_HINT: Final = b'"e2e_v2:'  # an instance's v2 refusal: {"detail":"e2e_v2:<code>"}
# A v2-only instance's refusal of a v1 blob: 426 {"detail": ..., "code": "v1_disabled"}.
_V1_DISABLED: Final = b'"v1_disabled"'
_V1_DISABLED_DETAIL: Final = (
    "E2E v1 is disabled on this instance: seal the request with wire profile v2 "
    "(the e2e_v2 key in discovery)"
)


class ForwardedResponse(StreamedResponse):
    """Streams an instance's response to the client as it arrives (no buffering); the upstream
    response is closed whatever happens, so the instance sees a client's hang-up."""

    def __init__(
        self,
        upstream: httpx2.Response,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        metrics: RelayMetrics,
    ) -> None:
        super().__init__(status, headers)
        self._upstream = upstream
        self._metrics = metrics
        self._sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.open_streams.inc()
        await super().__call__(scope, receive, send)

    async def write(self, send: Send) -> None:
        await self.send_start(send)
        try:
            async for chunk in self._upstream.aiter_raw():
                if chunk:
                    self._sent += len(chunk)
                    await self.send_body(send, chunk)
        except httpx2.HTTPError as exc:
            log.warning("instance response broke off mid-body (%s)", type(exc).__name__)
            return  # no final chunk: the client must not see a clean end
        await self.send_body(send, b"", more=False)

    async def finish(self, outcome: StreamOutcome) -> None:
        self._metrics.open_streams.dec()
        self._metrics.bytes_out.inc(self._sent)
        await self._upstream.aclose()


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


class Forwarder:
    """Sends accepted invocations to instances over ``client`` (set for the app's lifetime)."""

    def __init__(self, config: RelayConfig, metrics: RelayMetrics, prober: Prober) -> None:
        self.config = config
        self.metrics = metrics
        self.prober = prober
        self.client: httpx2.AsyncClient | None = None

    async def forward(self, request: Request, inst: InstanceState, length: int | None) -> Response:
        cfg = self.config
        client = self.client
        assert client is not None and inst.instance_id is not None
        headers = request.headers
        stream_flag = headers.get("x-e2e-stream", "false").strip().lower() == "true"
        out_headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/octet-stream"),
            (b"x-e2e-path", headers.get("x-e2e-path", "/").encode("latin-1")),
            (b"x-e2e-stream", b"true" if stream_flag else b"false"),
            (b"x-chute-id", headers["x-chute-id"].encode("latin-1")),
            (b"x-instance-id", inst.instance_id.encode("ascii")),
        ]
        if length is not None:
            out_headers.append((b"content-length", str(length).encode()))
        metrics = self.metrics
        limit = cfg.max_body
        uploaded = anyio.Event()

        async def body() -> AsyncIterator[bytes]:
            total = 0
            try:
                async for chunk in iter_body(request, limit):
                    total += len(chunk)
                    yield chunk
            except BodyTooLarge as exc:
                total = exc.received
                raise
            finally:
                uploaded.set()
                metrics.bytes_in.inc(min(total, limit))

        upstream_request = client.build_request(
            "POST", inst.url + "/e2e/invoke", headers=out_headers, content=body()
        )
        started = time.perf_counter()
        resp: httpx2.Response | None = None
        failure: Response | None = None
        # The upload owns ``receive`` until it is done; the watch listens after that.
        async with watch_disconnect(request.receive, after=uploaded):
            try:
                resp = await client.send(upstream_request, stream=True)
            except BodyTooLarge:
                failure = too_large(limit)
            except ClientDisconnect:
                failure = detail(400, "Client disconnected")
            except (httpx2.ConnectError, httpx2.ConnectTimeout):
                self.prober.mark_down(inst, "connection refused or timed out", cfg.gone_for)
                failure = gone()
            except httpx2.TimeoutException:
                failure = detail(504, "Instance timed out")
            except httpx2.HTTPError as exc:
                log.warning("instance %s: request failed (%s)", inst.url, type(exc).__name__)
                failure = detail(502, "Instance connection failed")
        if resp is None:
            return failure if failure is not None else Response(status_code=499)
        metrics.invoke_seconds.labels("true" if stream_flag else "false").observe(
            time.perf_counter() - started
        )
        return await self.answer(resp)

    async def answer(self, resp: httpx2.Response) -> Response:
        status = resp.status_code
        content_type = resp.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if status == 200 or media == "application/octet-stream":
            passed = [
                (name.encode("latin-1"), resp.headers[name].encode("latin-1"))
                for name in ("content-type", "content-length", "content-encoding")
                if name in resp.headers
            ]
            passed.append((b"cache-control", b"no-store"))
            return ForwardedResponse(resp, status, passed, self.metrics)
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
