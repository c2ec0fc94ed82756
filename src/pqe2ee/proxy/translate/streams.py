"""Streams: ``chat.completion.chunk`` dicts in, a dialect's stream events out.

Sans-IO: the caller parses the upstream's SSE into chunk dicts, feeds them one at a time, and
writes the ``(event_name, data)`` pairs it gets back as server-sent events.

* :class:`ChunkTranslator` — the skeleton: the :class:`~.chat.ChatChunkReader`, the sticky
  closed state, and one handler per :data:`~.chat.ChunkOp`;
* :class:`ResponsesStreamTranslator` — OpenAI Responses events (the ``response`` object and
  item shapes come from :mod:`.responses`);
* :class:`MessagesStreamTranslator` — Anthropic Messages events (``stop_reason`` and ``usage``
  rules from :mod:`.anthropic`).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pqe2ee.errors import LocalProtocolError
from pqe2ee.proxy.translate.anthropic import (
    parse_messages_request,
    stop_fields,
    wants_thinking,
)
from pqe2ee.proxy.translate.anthropic import usage_object as message_usage
from pqe2ee.proxy.translate.chat import (
    ChatChunkReader,
    ChatReply,
    ChunkOp,
    Finish,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    TextDelta,
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
)
from pqe2ee.proxy.translate.responses import usage_object as response_usage

__all__ = ["ChunkTranslator", "MessagesStreamTranslator", "ResponsesStreamTranslator"]


class ChunkTranslator(abc.ABC):
    """The skeleton of a dialect's stream translator: chunks in, ``(event_name, data)`` out.

    Holds the :class:`ChatChunkReader` and the sticky closed state, and drives the calls:
    :meth:`feed` reads a chunk and hands each :data:`ChunkOp` to one handler (``_on_*``);
    :meth:`finish` checks the upstream ended properly, then lets the dialect write its clean
    ending (:meth:`_end`); :meth:`error` ends with the dialect's failure events. A chunk or an
    ending that breaks the rules ends with those failure events too (:attr:`failure` is then
    set). Any call after the translator closed raises
    :class:`~pqe2ee.errors.LocalProtocolError`.
    """

    #: How the translator is named in the error raised once it is closed.
    dialect: ClassVar[str]

    def __init__(self, *, call_id_prefix: str) -> None:
        self._reader = ChatChunkReader(call_id_prefix)
        self._closed = False
        self.failure: TranslationError | None = None

    @property
    def closed(self) -> bool:
        """True once a terminal event (a clean end or a failure) was produced."""
        return self._closed

    def feed(self, chunk: dict[str, Any] | ChatReply) -> list[StreamEvent]:
        """Translate one parsed ``chat.completion.chunk`` (a dict, or a reply from
        :func:`~.chat.decode_chat_chunk`)."""
        self._check_open()
        out: list[StreamEvent] = []
        try:
            ops = self._reader.feed(chunk)
            out.extend(self.start())
            for op in ops:
                self._apply(op, out)
        except TranslationError as exc:
            out.extend(self._fail(exc))
        return out

    def finish(self) -> list[StreamEvent]:
        """End of the upstream stream: the dialect's clean ending, or its failure events if the
        stream was cut short (no ``finish_reason``, a tool call without a name)."""
        out = self.start()
        try:
            self._reader.end()
        except TranslationError as exc:
            out.extend(self._fail(exc))
            return out
        self._end(out)
        self._closed = True
        return out

    def error(self, status: int, type: str, message: str) -> list[StreamEvent]:
        """The upstream failed: the dialect's failure events; closes the stream."""
        self._check_open()
        return self._fail(TranslationError(status, type, message))

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError(f"the {self.dialect} stream translator is closed")

    def _apply(self, op: ChunkOp, out: list[StreamEvent]) -> None:
        if isinstance(op, ReasoningDelta):
            self._on_reasoning(op.text, out)
        elif isinstance(op, TextDelta):
            self._on_text(op.text, out)
        elif isinstance(op, RefusalDelta):
            self._on_refusal(op.text, out)
        elif isinstance(op, ToolCallStart):
            self._on_tool_start(op, out)
        elif isinstance(op, ToolCallArgs):
            self._on_tool_args(op, out)
        elif isinstance(op, Finish):
            self._on_finish(op, out)
        # UsageUpdate: the reader keeps the latest usage for the ending.

    @abc.abstractmethod
    def start(self) -> list[StreamEvent]:
        """The opening events if not yet sent (idempotent; also done by :meth:`feed`)."""

    @abc.abstractmethod
    def _fail(self, exc: TranslationError) -> list[StreamEvent]:
        """The failure events; sets :attr:`failure` and closes."""

    @abc.abstractmethod
    def _end(self, out: list[StreamEvent]) -> None:
        """Append the clean ending (the upstream ended properly)."""

    @abc.abstractmethod
    def _on_reasoning(self, text: str, out: list[StreamEvent]) -> None: ...

    @abc.abstractmethod
    def _on_text(self, text: str, out: list[StreamEvent]) -> None: ...

    @abc.abstractmethod
    def _on_refusal(self, text: str, out: list[StreamEvent]) -> None: ...

    @abc.abstractmethod
    def _on_tool_start(self, op: ToolCallStart, out: list[StreamEvent]) -> None: ...

    @abc.abstractmethod
    def _on_tool_args(self, op: ToolCallArgs, out: list[StreamEvent]) -> None: ...

    @abc.abstractmethod
    def _on_finish(self, op: Finish, out: list[StreamEvent]) -> None: ...


# ---------------------------------------------------------------------------------------------
# OpenAI Responses
# ---------------------------------------------------------------------------------------------


# Text that grows by deltas is kept as its pieces and joined when the whole is needed: ``+=`` on
# an attribute copies the whole text each time (quadratic over a long stream).


@dataclass(slots=True)
class _Part:
    kind: Literal["output_text", "refusal"]
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def to_dict(self) -> dict[str, Any]:
        return text_part(self.text) if self.kind == "output_text" else refusal_part(self.text)


@dataclass(slots=True)
class _Item:
    kind: Literal["reasoning", "message", "function_call"]
    id: str
    output_index: int
    status: str = "in_progress"
    pieces: list[str] = field(default_factory=list)  # reasoning text or function-call arguments
    parts: list[_Part] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        return "".join(self.pieces)

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

    def feed(self, chunk: dict[str, Any] | ChatReply) -> list[StreamEvent]:
        """Translate one parsed ``chat.completion.chunk`` (a dict, or a reply from
        :func:`~.chat.decode_chat_chunk`)."""
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
            usage=response_usage(self._reader.usage) if status != "in_progress" else None,
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
        self._message("output_text", text, out)

    def _on_refusal(self, text: str, out: list[StreamEvent]) -> None:
        self._message("refusal", text, out)

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
        item.pieces.append(text)
        out.append(
            self._emit(
                "response.reasoning_text.delta",
                {**self._where(item), "content_index": 0, "delta": text},
            )
        )

    def _message(
        self, kind: Literal["output_text", "refusal"], text: str, out: list[StreamEvent]
    ) -> None:
        item = self._open
        if item is None or item.kind != "message":
            self._close_open(out, "completed")
            item = self._new_item("message")
            self._added(item, out)
        if not item.parts or item.parts[-1].kind != kind:
            if item.parts:
                self._close_part(item, out)
            part = _Part(kind)
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
        current.pieces.append(text)
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
        item.pieces.append(op.fragment)
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
            text = item.text
            part = {"type": "reasoning_text", "text": text}
            out.append(self._emit("response.reasoning_text.done", {**where, "text": text}))
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


# ---------------------------------------------------------------------------------------------
# Anthropic Messages
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    kind: Literal["text", "thinking", "tool_use"]
    index: int


class MessagesStreamTranslator(ChunkTranslator):
    """Sans-IO translator: ``chat.completion.chunk`` dicts in, Anthropic stream events out.

    Call :meth:`feed` for each parsed chunk, then :meth:`finish` at end of stream, or
    :meth:`error` when the upstream fails. Each returns a list of ``(event_name, data)`` pairs
    with ``data["type"] == event_name``.

    Event order: ``message_start`` (empty content; ``usage.input_tokens`` if the first chunk
    carried usage, else 0), then per content block ``content_block_start`` /
    ``content_block_delta`` (``text_delta``, ``thinking_delta``, ``input_json_delta``) /
    ``content_block_stop`` — one block open at a time, a different kind of delta (or the next tool
    call) closes it — and at :meth:`finish` ``message_delta`` (``stop_reason``,
    ``stop_sequence``, ``usage`` with ``output_tokens`` and, when known, ``input_tokens`` and
    cache counts) and ``message_stop``.

    Failures never end cleanly: :meth:`error`, a malformed/error chunk passed to :meth:`feed`, or
    a stream without ``finish_reason`` at :meth:`finish` yields an ``error`` event
    (``{"type": "error", "error": {"type", "message"}}``) and closes the translator
    (:attr:`failure` is then set). Any call after the translator closed raises
    :class:`pqe2ee.errors.LocalProtocolError`. (``ping`` keep-alives are the caller's business.)
    """

    dialect = "Messages"

    def __init__(self, req: dict[str, Any]) -> None:
        self._req = parse_messages_request(req)
        self._thinking = wants_thinking(self._req)
        super().__init__(call_id_prefix="toolu_")
        self.message_id = new_id("msg_")
        self._started = False
        self._next_index = 0
        self._open: _Block | None = None
        self._tools: dict[int, _Block] = {}
        self._tool_calls = False
        self._refusal = False

    def start(self) -> list[StreamEvent]:
        """``message_start`` if not yet sent (idempotent; also done by the first :meth:`feed`)."""
        self._check_open()
        if self._started:
            return []
        self._started = True
        usage = self._reader.usage
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self._req.model or self._reader.model or "unknown",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**message_usage(usage), "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    # -- ChunkTranslator hooks ----------------------------------------------------------------

    def _end(self, out: list[StreamEvent]) -> None:
        """``message_delta`` (stop reason, usage) and ``message_stop``."""
        self._close_open(out)
        stop_reason, stop_sequence = stop_fields(
            self._reader.finish_reason,
            self._reader.matched_stop,
            self._req,
            tool_calls=self._tool_calls,
            refusal=self._refusal,
        )
        usage = self._reader.usage
        delta_usage = message_usage(usage) if usage is not None else {"output_tokens": 0}
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": delta_usage,
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))

    def _fail(self, exc: TranslationError) -> list[StreamEvent]:
        self.failure = exc
        self._closed = True
        self._open = None
        return [("error", exc.to_anthropic())]

    def _on_reasoning(self, text: str, out: list[StreamEvent]) -> None:
        if self._thinking:
            block = self._ensure("thinking", out)
            out.append(self._delta(block, {"type": "thinking_delta", "thinking": text}))

    def _on_text(self, text: str, out: list[StreamEvent]) -> None:
        block = self._ensure("text", out)
        out.append(self._delta(block, {"type": "text_delta", "text": text}))

    def _on_refusal(self, text: str, out: list[StreamEvent]) -> None:
        self._refusal = True
        self._on_text(text, out)

    def _on_tool_start(self, op: ToolCallStart, out: list[StreamEvent]) -> None:
        self._tool_calls = True
        self._close_open(out)
        block = self._new_block("tool_use")
        self._tools[op.index] = block
        start = {"type": "tool_use", "id": op.call_id, "name": op.name, "input": {}}
        out.append(self._start(block, start))

    def _on_tool_args(self, op: ToolCallArgs, out: list[StreamEvent]) -> None:
        block = self._tools[op.index]
        if block is not self._open:
            raise upstream_error("upstream interleaved the arguments of several tool calls")
        out.append(self._delta(block, {"type": "input_json_delta", "partial_json": op.fragment}))

    def _on_finish(self, op: Finish, out: list[StreamEvent]) -> None:
        self._close_open(out)

    # -- content blocks -----------------------------------------------------------------------

    def _new_block(self, kind: Literal["text", "thinking", "tool_use"]) -> _Block:
        block = _Block(kind, self._next_index)
        self._next_index += 1
        self._open = block
        return block

    def _ensure(self, kind: Literal["text", "thinking"], out: list[StreamEvent]) -> _Block:
        if self._open is not None and self._open.kind == kind:
            return self._open
        self._close_open(out)
        block = self._new_block(kind)
        if kind == "text":
            out.append(self._start(block, {"type": "text", "text": ""}))
        else:
            out.append(self._start(block, {"type": "thinking", "thinking": "", "signature": ""}))
        return block

    @staticmethod
    def _start(block: _Block, content_block: dict[str, Any]) -> StreamEvent:
        data = {"type": "content_block_start", "index": block.index, "content_block": content_block}
        return "content_block_start", data

    @staticmethod
    def _delta(block: _Block, delta: dict[str, Any]) -> StreamEvent:
        return "content_block_delta", {
            "type": "content_block_delta",
            "index": block.index,
            "delta": delta,
        }

    def _close_open(self, out: list[StreamEvent]) -> None:
        if self._open is not None:
            index = self._open.index
            self._open = None
            out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
