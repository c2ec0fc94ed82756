"""v2 requests in the instance (wire profile v2, spec/v2.md §4.2-§5).

The context header H is checked against what the relay delivered (``X-E2E-Path``,
``X-E2E-Stream``, ``X-E2E-Nonce`` when forwarded, ``X-Chute-Id``) and the instance's own ids,
the client time against a ±120 s window, the request id against the replay cache. Refusals are
plaintext hints ``{"detail":"e2e_v2:<code>"}`` (400; 409 replay; 413 oversize; 503 when the
replay cache cannot answer). Once a request opened, the answer is HTTP 200 and everything else
- the engine's status, content type, body, usage, and any engine failure - is inside
authenticated records (HEAD ... END).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

import httpx2
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from pqe2ee.errors import ErrorCode, PQE2EEError, RemoteProtocolError
from pqe2ee.protocol._codec import json_decode
from pqe2ee.protocol.v2 import (
    OpenedRequestV2,
    ResponseSealer,
    StreamEncoderV2,
    UpstreamError,
    instance_error_response,
    seal_response_v2,
)
from pqe2ee.server.instance.exchange import (
    SSE_HEADERS,
    EngineFailure,
    Reject,
    RequestLog,
    Slot,
    logger,
    off_loop_if_big,
    open_off_loop_if_big,
    timed_out,
    unreachable,
)
from pqe2ee.server.instance.keys import Keys
from pqe2ee.server.instance.upstream import Buffered, Engine, EngineStream, Streaming
from pqe2ee.server.replaycache import ReplayCacheError

__all__ = ["SealedStreamV2", "V2Handler", "engine_outcome"]

_V2_ERROR_MESSAGE_MAX: Final = 1024  # engine error message copied into END.error
_SSE_TEXT_HEADERS: Final = {k.decode(): v.decode() for k, v in SSE_HEADERS}


def _refusal(exc: PQE2EEError) -> Reject:
    status, body = instance_error_response(exc)
    return Reject(Response(body, status_code=status, media_type="application/json"), exc.code.value)


def engine_outcome(status: int, body: bytes) -> tuple[dict[str, Any] | None, UpstreamError | None]:
    """``(usage, error)`` for END from a buffered engine answer.

    usage: the body's ``usage`` object (2xx). error (non-2xx): type and message from the
    OpenAI shape ``{"error": {"type", "message"}}`` or vLLM's flat ``{"object": "error",
    "type", "message"}``, else ``upstream_error``; the whole body is in DATA either way.
    """
    try:
        doc = json_decode(body) if body[:1] == b"{" else None
    except msgspec.DecodeError:
        doc = None
    if 200 <= status < 300:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        return (usage if isinstance(usage, dict) else None), None
    err_type, message = ErrorCode.UPSTREAM_ERROR.value, f"the engine answered {status}"
    if isinstance(doc, dict):
        inner = doc.get("error")
        source = inner if isinstance(inner, dict) else doc
        if isinstance(source.get("type"), str) and source["type"]:
            err_type = source["type"][:128]
        if isinstance(source.get("message"), str) and source["message"]:
            message = source["message"][:_V2_ERROR_MESSAGE_MAX]
    return None, UpstreamError(err_type, message, status)


class SealedStreamV2(EngineStream[StreamEncoderV2]):
    """Engine SSE in, outer v2 SSE out (spec/v2.md §5.5): init and HEAD, one DATA record per
    engine chunk, then the usage copy and END - with ``error`` when the engine broke off or
    timed out, so the client gets an authenticated failure, never a clean-looking end. If a
    record cannot be sealed the response is aborted (no final chunk: the connection drops and
    the client reports truncation); a record is never skipped. The records of engine chunks
    that arrived together leave as one body message."""

    _error: UpstreamError | None = None

    async def pump(self, send: Send) -> str | None:
        try:
            await self.send_records(send, self._sealed_records())
        except PQE2EEError as exc:
            logger.error("v2 stream aborted: a record could not be sealed (%s)", exc.code.value)
            return exc.code.value
        return None if self._error is None else self._error.type

    async def _sealed_records(self) -> AsyncGenerator[bytes, None]:
        """The outer stream: init and HEAD, the records of each engine chunk, then END (with
        the engine's failure, if it broke off or timed out: kept in ``_error``)."""
        upstream = self._upstream
        encoder = self._encoder
        yield encoder.start(upstream.status_code, upstream.headers.get("content-type"))
        try:
            async for chunk in self.engine_chunks():
                self._log.bytes_in += len(chunk)
                yield encoder.feed(chunk)
            # The engine's connection goes back to the pool now, not after the last write.
            await upstream.aclose()
        except httpx2.TimeoutException:
            self._error = timed_out().upstream_error()
        except (httpx2.HTTPError, httpx2.StreamError):
            self._error = unreachable("the engine's stream broke").upstream_error()
        yield encoder.finish(error=self._error)


class V2Handler:
    """Opens v2 blobs and answers them through ``engine``, in authenticated records."""

    def __init__(self, keys: Keys, engine: Engine) -> None:
        self.keys = keys
        self.engine = engine

    def _open_sync(
        self, blob: bytes, path: str, stream: bool, relay_nonce: str | None, max_body: int
    ) -> OpenedRequestV2:
        assert self.keys.v2 is not None
        return self.keys.v2.open(
            blob,
            path=path,
            stream=stream,
            now_ms=int(time.time() * 1000),
            relay_nonce=relay_nonce,
            max_body=max_body,
        )

    async def invoke(
        self, request: Request, path: str, blob: bytes, slot: Slot, log: RequestLog
    ) -> Response:
        log.proto = "v2"
        keys = self.keys
        if keys.v2 is None:
            # No v2 key here (--no-v2): the client's offer is stale; it rediscovers.
            raise _refusal(
                RemoteProtocolError("this instance does not serve v2", code=ErrorCode.UNKNOWN_KEY)
            )
        headers = request.headers
        stream = headers.get("x-e2e-stream", "false").strip().lower() == "true"
        log.stream = stream
        nonce = headers.get("x-e2e-nonce")
        try:
            opened = await open_off_loop_if_big(
                lambda bound: self._open_sync(blob, path, stream, nonce, bound),
                len(blob),
                keys.v2.max_body,
                always=keys.v2_threaded,
            )
        except ReplayCacheError:  # a PQE2EEError too (StoreUnavailable): caught first
            raise Reject.error(
                503,
                "Replay cache unavailable, try again later",
                ErrorCode.REPLAY_CACHE_UNAVAILABLE.value,
            ) from None
        except PQE2EEError as exc:
            raise _refusal(exc) from None
        h = opened.header
        log.chute = h.chute_id
        delivered = headers.get("x-chute-id")
        if delivered is not None and delivered.strip().lower() != h.chute_id:
            # The relay routed (and spent its nonce) for another chute than the client sealed.
            raise _refusal(
                RemoteProtocolError("X-Chute-Id does not match", code=ErrorCode.CONTEXT_MISMATCH)
            )
        try:
            sealer = ResponseSealer.for_request(opened, xwing=keys.xwing, aead=keys.aead)
        except PQE2EEError as exc:  # the client's response key cannot be encapsulated to
            raise _refusal(exc) from None
        upstream_request = self.engine.request(
            h.path, stream=h.stream, obj=opened.json, raw=opened.body, continuous_usage=False
        )
        if h.stream:
            return await self._stream(request, upstream_request, sealer, slot, log)
        # Compress the answer only when the client compressed its request (issue 16: gzip next
        # to caller-influenced text is a length oracle; the client's choice stands for both).
        return await self._unary(request, upstream_request, sealer, log, opened.compressed)

    async def _unary(
        self,
        request: Request,
        upstream_request: httpx2.Request,
        sealer: ResponseSealer,
        log: RequestLog,
        compress: bool = False,
    ) -> Response:
        failed: UpstreamError | None = None
        try:
            result = await self.engine.call(request.receive, upstream_request, stream=False)
        except EngineFailure as failure:
            status, body, ctype, failed = failure.status, b"", None, failure.upstream_error()
            code: str | None = failure.code
        else:
            assert isinstance(result, Buffered)
            status, body, ctype = result.status, result.body, result.content_type
            log.upstream_status = status
            code = None if 200 <= status < 300 else ErrorCode.UPSTREAM_ERROR.value

        def seal() -> bytes:
            usage, error = (None, failed) if failed is not None else engine_outcome(status, body)
            return seal_response_v2(
                sealer,
                status=status,
                body=body,
                content_type=ctype,
                usage=usage,
                error=error,
                compress=compress,
            )

        blob = await self._sealed(seal, len(body))
        log.bytes_out = len(blob)
        log.emit(200, code)
        # HTTP 200 whatever the engine said: its status is in the authenticated HEAD record.
        return Response(blob, status_code=200, media_type="application/octet-stream")

    async def _stream(
        self,
        request: Request,
        upstream_request: httpx2.Request,
        sealer: ResponseSealer,
        slot: Slot,
        log: RequestLog,
    ) -> Response:
        encoder = StreamEncoderV2(sealer)
        size = 0
        try:
            result = await self.engine.call(request.receive, upstream_request, stream=True)
        except EngineFailure as failure:
            code, failed = failure.code, failure.upstream_error()

            def events() -> bytes:
                return encoder.start(failed.status or 502, None) + encoder.finish(error=failed)

        else:
            if isinstance(result, Streaming):
                log.upstream_status = result.response.status_code
                return SealedStreamV2(result.response, encoder, slot=slot, log=log)
            # The engine refused with a (buffered) error body: HEAD with its status, the body
            # as DATA, END with the error.
            buffered = result
            log.upstream_status = buffered.status
            code = ErrorCode.UPSTREAM_ERROR.value
            size = len(buffered.body)

            def events() -> bytes:
                _, error = engine_outcome(buffered.status, buffered.body)
                return b"".join(
                    (
                        encoder.start(buffered.status, buffered.content_type),
                        encoder.feed(buffered.body),
                        encoder.finish(error=error),
                    )
                )

        content = await self._sealed(events, size)
        log.bytes_out = len(content)
        log.emit(200, code)
        return Response(content, status_code=200, headers=_SSE_TEXT_HEADERS)

    @staticmethod
    async def _sealed(seal: Callable[[], bytes], size: int) -> bytes:
        try:
            return await off_loop_if_big(seal, size)
        except PQE2EEError as exc:
            raise Reject.encryption_failed(500, exc) from None
