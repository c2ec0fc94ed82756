"""Anthropic Messages streaming: ``chat.completion.chunk`` dicts in, Anthropic events out.

:class:`MessagesStreamTranslator` is sans-IO: the caller parses the upstream's SSE into chunk
dicts, feeds them one at a time and writes the ``(event_name, data)`` pairs it gets back as
server-sent events. The request-side mapping, ``stop_reason`` and ``usage`` rules are
:mod:`pqe2ee.proxy.translate.anthropic`; reading chunks is
:class:`pqe2ee.proxy.translate.chat.ChatChunkReader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pqe2ee.proxy.translate.anthropic import (
    parse_messages_request,
    stop_fields,
    usage_object,
    wants_thinking,
)
from pqe2ee.proxy.translate.chat import (
    ChunkTranslator,
    Finish,
    StreamEvent,
    ToolCallArgs,
    ToolCallStart,
    new_id,
)
from pqe2ee.proxy.translate.errors import TranslationError, upstream_error

__all__ = ["MessagesStreamTranslator"]


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
            "usage": {**usage_object(usage), "output_tokens": 0},
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
        delta_usage = usage_object(usage) if usage is not None else {"output_tokens": 0}
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
