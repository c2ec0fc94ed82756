"""OpenAI Responses streaming: ``chat.completion.chunk`` dicts in, Responses events out.

:class:`ResponsesStreamTranslator` is sans-IO: the caller parses the upstream's SSE into chunk
dicts, feeds them one at a time and writes the ``(event_name, data)`` pairs it gets back as
server-sent events. The request-side mapping and the ``response`` / item shapes it emits are
:mod:`pqe2ee.proxy.translate.responses`; reading chunks is
:class:`pqe2ee.proxy.translate.chat.ChatChunkReader`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pqe2ee.proxy.translate.chat import (
    ChunkTranslator,
    Finish,
    StreamEvent,
    ToolCallArgs,
    ToolCallStart,
    new_id,
)
from pqe2ee.proxy.translate.errors import TranslationError, upstream_error
from pqe2ee.proxy.translate.responses import (
    function_call_item,
    incomplete_of,
    parse_responses_request,
    reasoning_item,
    refusal_part,
    response_error_code,
    response_object,
    text_part,
    usage_object,
)

__all__ = ["ResponsesStreamTranslator"]


@dataclass(slots=True)
class _Part:
    kind: Literal["output_text", "refusal"]
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return text_part(self.text) if self.kind == "output_text" else refusal_part(self.text)


@dataclass(slots=True)
class _Item:
    kind: Literal["reasoning", "message", "function_call"]
    id: str
    output_index: int
    status: str = "in_progress"
    text: str = ""  # reasoning text or function-call arguments
    parts: list[_Part] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "reasoning":
            return reasoning_item(self.id, self.text, self.status)
        if self.kind == "function_call":
            return function_call_item(self.id, self.call_id, self.name, self.text, self.status)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "status": self.status,
            "content": [p.to_dict() for p in self.parts],
        }


class ResponsesStreamTranslator(ChunkTranslator):
    """Sans-IO translator: ``chat.completion.chunk`` dicts in, Responses stream events out.

    Call :meth:`feed` for each parsed chunk, then :meth:`finish` at end of stream, or
    :meth:`error` when the upstream fails. Each returns a list of ``(event_name, data)`` pairs;
    ``data["type"] == event_name`` and ``data["sequence_number"]`` counts from 0 across the stream.

    Event order: ``response.created``, ``response.in_progress``, then per output item
    ``response.output_item.added`` … ``response.output_item.done`` (with
    ``content_part.added``/``output_text.delta``/``output_text.done``/``content_part.done`` for
    messages, ``reasoning_text.*`` for reasoning, ``function_call_arguments.delta``/``.done`` for
    function calls), finally ``response.completed`` (or ``response.incomplete`` when the upstream
    stopped at the token limit). One item is open at a time: a different kind of delta closes it.

    Failures never end cleanly: :meth:`error`, a malformed/error chunk passed to :meth:`feed`, or
    a stream without ``finish_reason`` at :meth:`finish` yields an ``error`` event followed by
    ``response.failed`` and closes the translator (:attr:`failure` is then set). Any call after
    the translator closed raises :class:`pqe2ee.errors.LocalProtocolError`.
    """

    dialect = "Responses"

    def __init__(self, req: dict[str, Any]) -> None:
        self._req = parse_responses_request(req)
        super().__init__(call_id_prefix="call_")
        self.response_id = new_id("resp_")
        self._created_at = int(time.time())
        self._seq = 0
        self._started = False
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._tools: dict[int, _Item] = {}

    def start(self) -> list[StreamEvent]:
        """``response.created`` and ``response.in_progress`` if not yet sent (idempotent; also
        done implicitly by the first :meth:`feed`). Lets the caller answer before the first
        upstream chunk arrives."""
        self._check_open()
        if self._started:
            return []
        self._started = True
        return [
            self._emit("response.created", {"response": self._response("in_progress")}),
            self._emit("response.in_progress", {"response": self._response("in_progress")}),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        """Translate one parsed ``chat.completion.chunk``."""
        # The opening goes first and echoes only the request: it never depends on the chunk.
        out = self.start()
        return out + super().feed(chunk)

    # -- ChunkTranslator hooks ----------------------------------------------------------------

    def _end(self, out: list[StreamEvent]) -> None:
        """The terminal ``response.completed`` / ``response.incomplete`` event."""
        incomplete = incomplete_of(self._reader.finish_reason)
        self._close_open(out, "incomplete" if incomplete is not None else "completed")
        status = "incomplete" if incomplete is not None else "completed"
        response = self._response(status, incomplete_reason=incomplete)
        out.append(self._emit(f"response.{status}", {"response": response}))

    def _emit(self, kind: str, fields: dict[str, Any]) -> StreamEvent:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return kind, data

    def _model(self) -> str:
        return self._req.model or self._reader.model or "unknown"

    def _response(
        self,
        status: str,
        *,
        incomplete_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self._req,
            response_id=self.response_id,
            created_at=self._created_at,
            model=self._model(),
            status=status,
            output=[item.to_dict() for item in self._items],
            usage=usage_object(self._reader.usage) if status != "in_progress" else None,
            incomplete_reason=incomplete_reason,
            error=error,
        )

    def _fail(self, exc: TranslationError) -> list[StreamEvent]:
        out = self.start()
        self.failure = exc
        if self._open is not None:
            self._open.status = "incomplete"
            self._open = None
        out.append(self._emit("error", {"code": exc.type, "message": exc.message, "param": None}))
        error = {"code": response_error_code(exc.status), "message": exc.message}
        out.append(
            self._emit("response.failed", {"response": self._response("failed", error=error)})
        )
        self._closed = True
        return out

    def _on_reasoning(self, text: str, out: list[StreamEvent]) -> None:
        self._reasoning(text, out)

    def _on_text(self, text: str, out: list[StreamEvent]) -> None:
        self._message(_Part("output_text"), text, out)

    def _on_refusal(self, text: str, out: list[StreamEvent]) -> None:
        self._message(_Part("refusal"), text, out)

    def _on_finish(self, op: Finish, out: list[StreamEvent]) -> None:
        status = "incomplete" if incomplete_of(op.reason) is not None else "completed"
        self._close_open(out, status)

    # -- output items -------------------------------------------------------------------------

    def _new_item(self, kind: Literal["reasoning", "message", "function_call"]) -> _Item:
        prefix = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}[kind]
        item = _Item(kind, new_id(prefix), len(self._items))
        self._items.append(item)
        self._open = item
        return item

    def _added(self, item: _Item, out: list[StreamEvent]) -> None:
        snapshot = item.to_dict()
        if item.kind == "reasoning":
            snapshot["content"] = []
        out.append(
            self._emit(
                "response.output_item.added",
                {"output_index": item.output_index, "item": snapshot},
            )
        )

    def _where(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.output_index}

    def _reasoning(self, text: str, out: list[StreamEvent]) -> None:
        item = self._open
        if item is None or item.kind != "reasoning":
            self._close_open(out, "completed")
            item = self._new_item("reasoning")
            self._added(item, out)
            part = {"type": "reasoning_text", "text": ""}
            out.append(
                self._emit(
                    "response.content_part.added",
                    {**self._where(item), "content_index": 0, "part": part},
                )
            )
        item.text += text
        out.append(
            self._emit(
                "response.reasoning_text.delta",
                {**self._where(item), "content_index": 0, "delta": text},
            )
        )

    def _message(self, part: _Part, text: str, out: list[StreamEvent]) -> None:
        item = self._open
        if item is None or item.kind != "message":
            self._close_open(out, "completed")
            item = self._new_item("message")
            self._added(item, out)
        if not item.parts or item.parts[-1].kind != part.kind:
            if item.parts:
                self._close_part(item, out)
            item.parts.append(part)
            out.append(
                self._emit(
                    "response.content_part.added",
                    {
                        **self._where(item),
                        "content_index": len(item.parts) - 1,
                        "part": part.to_dict(),
                    },
                )
            )
        current = item.parts[-1]
        current.text += text
        where = {**self._where(item), "content_index": len(item.parts) - 1, "delta": text}
        if current.kind == "output_text":
            out.append(self._emit("response.output_text.delta", {**where, "logprobs": []}))
        else:
            out.append(self._emit("response.refusal.delta", where))

    def _close_part(self, item: _Item, out: list[StreamEvent]) -> None:
        index = len(item.parts) - 1
        part = item.parts[index]
        where = {**self._where(item), "content_index": index}
        if part.kind == "output_text":
            out.append(
                self._emit(
                    "response.output_text.done", {**where, "text": part.text, "logprobs": []}
                )
            )
        else:
            out.append(self._emit("response.refusal.done", {**where, "refusal": part.text}))
        out.append(self._emit("response.content_part.done", {**where, "part": part.to_dict()}))

    def _on_tool_start(self, op: ToolCallStart, out: list[StreamEvent]) -> None:
        self._close_open(out, "completed")
        item = self._new_item("function_call")
        item.call_id = op.call_id
        item.name = op.name
        self._tools[op.index] = item
        self._added(item, out)

    def _on_tool_args(self, op: ToolCallArgs, out: list[StreamEvent]) -> None:
        item = self._tools.get(op.index)
        if item is None or item is not self._open:
            raise upstream_error("upstream interleaved the arguments of several tool calls")
        item.text += op.fragment
        out.append(
            self._emit(
                "response.function_call_arguments.delta",
                {**self._where(item), "delta": op.fragment},
            )
        )

    def _close_open(self, out: list[StreamEvent], status: str) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        item.status = status
        if item.kind == "reasoning":
            where = {**self._where(item), "content_index": 0}
            part = {"type": "reasoning_text", "text": item.text}
            out.append(self._emit("response.reasoning_text.done", {**where, "text": item.text}))
            out.append(self._emit("response.content_part.done", {**where, "part": part}))
        elif item.kind == "message":
            if item.parts:
                self._close_part(item, out)
        else:
            out.append(
                self._emit(
                    "response.function_call_arguments.done",
                    {**self._where(item), "arguments": item.text, "name": item.name},
                )
            )
        out.append(
            self._emit(
                "response.output_item.done",
                {"output_index": item.output_index, "item": item.to_dict()},
            )
        )
