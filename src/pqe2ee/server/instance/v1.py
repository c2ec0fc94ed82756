"""v1 requests in the instance (the Chutes wire format, SPEC.md).

The blob is opened with the instance's ML-KEM-768 key; the engine's answer is sealed to the
client's one-time response key - whole (any status: an engine error keeps the engine's status,
so only the client can read the engine's message) or as an outer SSE stream of one record per
engine line. A stream whose engine connection breaks ends with an ``e2e_error`` event and an
abrupt close, never with anything that looks like a clean end.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx2
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from pqe2ee.backends.base import check_mlkem768_public_key
from pqe2ee.errors import ErrorCode, LimitExceeded, PQE2EEError
from pqe2ee.protocol import (
    OpenedRequest,
    StreamEncoder,
    StreamSealer,
    open_request,
    seal_response,
)
from pqe2ee.server._asgi import json_response
from pqe2ee.server.instance.config import InstanceConfig
from pqe2ee.server.instance.exchange import (
    EngineFailure,
    Reject,
    RequestLog,
    Slot,
    off_loop_if_big,
    open_off_loop_if_big,
)
from pqe2ee.server.instance.keys import Keys
from pqe2ee.server.instance.upstream import Buffered, Engine, EngineStream

__all__ = ["SealedStream", "V1Handler"]


def _stream_encoder(sealer: StreamSealer) -> StreamEncoder:
    """The record encoder, looked up on the package at call time: tests substitute
    ``pqe2ee.server.instance.StreamEncoder`` (tests/faults.py ``RechunkingEncoder``)."""
    from pqe2ee.server import instance

    encoder: StreamEncoder = instance.StreamEncoder(sealer)
    return encoder


class SealedStream(EngineStream[StreamEncoder]):
    """Engine SSE in, outer v1 SSE out, one record per engine line, nothing held back (the
    records of engine chunks that arrived together leave as one body message)."""

    async def pump(self, send: Send) -> str | None:
        try:
            await self.send_records(send, self._sealed_records())
        except (httpx2.HTTPError, httpx2.StreamError):
            code = ErrorCode.UPSTREAM_ERROR.value
            message = "the engine's stream broke"
        except LimitExceeded:
            code = ErrorCode.OVERSIZE.value
            message = "the engine sent a line longer than the record limit"
        else:
            return None
        # No final empty chunk: returning now makes the server drop the connection, so no
        # client can mistake this for a clean end.
        await self.send_body(send, StreamSealer.error_event({"code": code, "message": message}))
        return code

    async def _sealed_records(self) -> AsyncGenerator[bytes, None]:
        """The outer stream: the init event, the records of each engine chunk, the last."""
        encoder = self._encoder
        yield encoder.start()
        async for chunk in self.engine_chunks():
            self._log.bytes_in += len(chunk)
            yield encoder.feed(chunk)
        # The engine's connection goes back to the pool now, not after the last write.
        await self._upstream.aclose()
        yield encoder.finish()


class V1Handler:
    """Opens v1 blobs and answers them through ``engine``."""

    def __init__(self, config: InstanceConfig, keys: Keys, engine: Engine) -> None:
        self.config = config
        self.keys = keys
        self.engine = engine

    async def invoke(
        self, request: Request, path: str, blob: bytes, slot: Slot, log: RequestLog
    ) -> Response:
        log.proto = "v1"
        if self.config.v2_only:
            code = ErrorCode.V1_DISABLED.value
            raise Reject(
                json_response(
                    {
                        "detail": "E2E v1 is disabled on this instance: seal the request "
                        "with wire profile v2 (the e2e_v2 key in discovery)",
                        "code": code,
                    },
                    426,
                    {"upgrade": "pqe2ee-v2"},
                ),
                code,
            )
        opened = await self._open(blob)
        log.stream = opened.stream
        header_stream = request.headers.get("x-e2e-stream", "false").strip().lower() == "true"
        if header_stream != opened.stream:
            raise Reject.error(
                400,
                "X-E2E-Stream does not match the request body's stream flag",
                ErrorCode.STREAM_MISMATCH.value,
            )
        if opened.stream:
            return await self._stream(request, path, opened, slot, log)
        return await self._unary(request, path, opened, log)

    def _open_sync(self, blob: bytes, max_plaintext: int) -> OpenedRequest:
        opened = open_request(
            blob, self.keys.private_key, aead=self.keys.aead, max_plaintext=max_plaintext
        )
        check_mlkem768_public_key(opened.response_public_key)
        return opened

    async def _open(self, blob: bytes) -> OpenedRequest:
        try:
            return await open_off_loop_if_big(
                lambda bound: self._open_sync(blob, bound), len(blob), self.config.max_plaintext
            )
        except PQE2EEError as exc:
            # Never echo anything of the body; the code says which rule failed.
            raise Reject.error(400, "E2E decryption failed", exc.code.value) from None

    def _engine_request(self, path: str, opened: OpenedRequest) -> httpx2.Request:
        return self.engine.request(
            path,
            stream=opened.stream,
            obj=opened.body,
            raw=opened.json,
            continuous_usage=self.config.continuous_usage,
        )

    async def _sealed(
        self, status: int, body: bytes, opened: OpenedRequest, log: RequestLog
    ) -> Response:
        keys = self.keys

        def seal() -> bytes:
            return seal_response(body, opened.response_public_key, kem=keys.kem, aead=keys.aead)

        try:
            blob = await off_loop_if_big(seal, len(body))
        except PQE2EEError as exc:
            raise Reject.encryption_failed(400, exc) from None
        log.bytes_out = len(blob)
        code = None if 200 <= status < 300 else ErrorCode.UPSTREAM_ERROR.value
        log.emit(status, code)
        # Engine errors keep the engine's status; the body is sealed either way, so only the
        # client can read the engine's message.
        return Response(blob, status_code=status, media_type="application/octet-stream")

    async def _unary(
        self, request: Request, path: str, opened: OpenedRequest, log: RequestLog
    ) -> Response:
        try:
            result = await self.engine.call(
                request.receive, self._engine_request(path, opened), stream=False
            )
        except EngineFailure as failure:
            raise failure.reject() from None
        assert isinstance(result, Buffered)
        log.upstream_status = result.status
        status = result.status if not 200 <= result.status < 300 else 200
        return await self._sealed(status, result.body, opened, log)

    async def _stream(
        self, request: Request, path: str, opened: OpenedRequest, slot: Slot, log: RequestLog
    ) -> Response:
        keys = self.keys
        try:
            sealer = StreamSealer(opened.response_public_key, kem=keys.kem, aead=keys.aead)
        except PQE2EEError as exc:
            raise Reject.encryption_failed(400, exc) from None
        try:
            result = await self.engine.call(
                request.receive, self._engine_request(path, opened), stream=True
            )
        except EngineFailure as failure:
            raise failure.reject() from None
        if isinstance(result, Buffered):  # engine error: sealed like a non-stream reply
            log.upstream_status = result.status
            return await self._sealed(result.status, result.body, opened, log)
        log.upstream_status = result.response.status_code
        return SealedStream(result.response, _stream_encoder(sealer), slot=slot, log=log)
