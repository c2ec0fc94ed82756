"""The Chat Completions side of every translation: what the proxy sends and what comes back.

Both translated dialects (:mod:`.responses`, :mod:`.anthropic`) forward to, and read replies
from, an OpenAI Chat Completions endpoint. What they share lives here:

* lenient msgspec structs for ``chat.completion`` / ``chat.completion.chunk``
  (:func:`parse_chat_reply`, which also surfaces errors an upstream reports in-band) and small
  readers over them (:func:`reply_message`, :func:`function_calls`, :func:`content_text`, ...);
* :class:`ChatChunkReader`, which turns chunks into a flat list of semantic operations
  (:data:`ChunkOp`) that the dialects' stream translators (:mod:`.streams`) render;
* :func:`chat_request` (the create body, in one field order for both dialects) and
  :class:`ChatMessagesBuilder`, which accumulates the ``messages`` list of a request under the
  rules open-model chat templates need (one leading system message, alternating roles, tool
  messages right after the assistant's calls).

Pure and sans-IO: plain ``dict`` values in and out, no HTTP, no SSE bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec

from pqe2ee._json import json_decode
from pqe2ee.proxy.translate.errors import TranslationError, upstream_error

__all__ = [
    "ChatChoice",
    "ChatChunkReader",
    "ChatMessage",
    "ChatMessagesBuilder",
    "ChatReply",
    "ChatUsage",
    "ChunkOp",
    "Finish",
    "ReasoningDelta",
    "RefusalDelta",
    "StreamEvent",
    "TextDelta",
    "ToolCallArgs",
    "ToolCallStart",
    "UsageUpdate",
    "chat_request",
    "content_text",
    "decode_chat_chunk",
    "first_choice",
    "function_calls",
    "function_tool",
    "json_text",
    "matched_stop",
    "new_id",
    "parse_chat_reply",
    "reasoning_text",
    "reply_message",
    "without_none",
]

#: One output event: ``(event_name, data)``; write as ``event: <name>\ndata: <json>\n\n``.
StreamEvent: TypeAlias = tuple[str, dict[str, Any]]


def new_id(prefix: str) -> str:
    """A random identifier such as ``resp_<32 hex>``."""
    return prefix + secrets.token_hex(16)


def json_text(value: object) -> str:
    """Compact JSON text of ``value`` (UTF-8, not ASCII-escaped)."""
    return msgspec.json.encode(value).decode()


# ---------------------------------------------------------------------------------------------
# Replies: chat.completion and chat.completion.chunk
# ---------------------------------------------------------------------------------------------


class ChatFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: ChatFunction | None = None


class ChatMessage(msgspec.Struct):
    """A ``message`` of a ``chat.completion`` or a ``delta`` of a chunk."""

    role: str | None = None
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoice(msgspec.Struct):
    index: int = 0
    message: ChatMessage | None = None
    delta: ChatMessage | None = None
    finish_reason: str | None = None
    # vLLM reports the matched stop string (or token id) here, SGLang in ``matched_stop``.
    stop_reason: int | str | None = None
    matched_stop: int | str | None = None


class ChatPromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class ChatCompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None
    prompt_tokens_details: ChatPromptDetails | None = None
    completion_tokens_details: ChatCompletionDetails | None = None

    @property
    def cached_tokens(self) -> int:
        d = self.prompt_tokens_details
        return (d.cached_tokens or 0) if d is not None else 0

    @property
    def reasoning_tokens(self) -> int:
        d = self.completion_tokens_details
        return (d.reasoning_tokens or 0) if d is not None else 0


class ChatReply(msgspec.Struct):
    """A ``chat.completion`` or a ``chat.completion.chunk`` (lenient: unknown fields ignored)."""

    id: str | None = None
    object: str | None = None
    created: int | float | None = None
    model: str | None = None
    choices: list[ChatChoice] = []
    usage: ChatUsage | None = None
    error: Any = None


def _upstream_reported_error(obj: Mapping[str, Any]) -> TranslationError | None:
    """The error an upstream body reports in-band (``{"error": {...}}`` or vLLM's
    ``{"object": "error", ...}``), if any."""
    err: object
    if obj.get("error"):
        err = obj["error"]
    elif obj.get("object") == "error":
        err = obj
    else:
        return None
    status, kind, message = 502, "server_error", "upstream reported an error"
    if isinstance(err, str):
        message = err
    elif isinstance(err, Mapping):
        code = err.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            status = code
        if isinstance(err.get("type"), str) and err["type"]:
            kind = err["type"]
        if isinstance(err.get("message"), str) and err["message"]:
            message = err["message"]
    return TranslationError(status, kind, message, error_code="upstream_error")


def parse_chat_reply(obj: object) -> ChatReply:
    """Validate an upstream ``chat.completion`` / ``chat.completion.chunk`` dict.

    Raises :class:`TranslationError`: the upstream's own status/type/message when the body
    reports an error in-band, else a 502 ``server_error`` when the shape is wrong. A
    :class:`ChatReply` from :func:`decode_chat_chunk` is already both and passes as it is.
    """
    if isinstance(obj, ChatReply):
        return obj
    if not isinstance(obj, Mapping):
        raise upstream_error("upstream reply is not a JSON object")
    reported = _upstream_reported_error(obj)
    if reported is not None:
        raise reported
    try:
        return msgspec.convert(obj, ChatReply)
    except msgspec.ValidationError as exc:
        raise upstream_error(f"malformed upstream reply: {exc}") from None


_CHUNK_DECODER: msgspec.json.Decoder[ChatReply] = msgspec.json.Decoder(ChatReply)


def decode_chat_chunk(data: str | bytes) -> ChatReply | None:
    """An upstream chunk's JSON decoded straight into a :class:`ChatReply` (no dict in
    between) when it is a well-formed reply that reports no error in-band; ``None`` for
    anything else - the caller then decodes it as JSON on its own and :func:`parse_chat_reply`
    answers it exactly as before (the same checks, the same errors, in the same order)."""
    try:
        reply = json_decode(data, decoder=_CHUNK_DECODER)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    # What _upstream_reported_error looks at, on the same values.
    return None if reply.error or reply.object == "error" else reply


def content_text(content: object) -> str:
    """Text of a Chat Completions ``content`` (a string, ``None`` or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    raise upstream_error("malformed upstream reply: content is neither a string nor a list")


def reasoning_text(msg: ChatMessage) -> str:
    """Reasoning text of a message/delta: ``reasoning_content`` or vLLM's newer ``reasoning``."""
    for value in (msg.reasoning_content, msg.reasoning):
        if isinstance(value, str) and value:
            return value
    return ""


def first_choice(reply: ChatReply) -> ChatChoice | None:
    """Choice 0 (other choices are ignored: neither target dialect has ``n > 1``)."""
    for choice in reply.choices:
        if choice.index == 0:
            return choice
    return reply.choices[0] if reply.choices else None


def matched_stop(choice: ChatChoice) -> str | None:
    """The stop string the upstream says it matched (vLLM ``stop_reason``, SGLang
    ``matched_stop``), when it is a string."""
    for value in (choice.stop_reason, choice.matched_stop):
        if isinstance(value, str):
            return value
    return None


def reply_message(chat: object) -> tuple[ChatReply, ChatChoice, ChatMessage]:
    """The reply, its choice 0 and that choice's ``message``, of a non-streamed
    ``chat.completion``; a 502 :class:`TranslationError` if it has none (or the upstream's own
    error when it reports one)."""
    reply = parse_chat_reply(chat)
    choice = first_choice(reply)
    if choice is None or choice.message is None:
        raise upstream_error("upstream reply has no choices")
    return reply, choice, choice.message


def function_calls(msg: ChatMessage) -> list[tuple[str | None, str, str]]:
    """``(id, name, arguments)`` of each tool call of a complete message (``arguments`` ``""``
    when absent); a 502 :class:`TranslationError` if one has no function name."""
    out: list[tuple[str | None, str, str]] = []
    for call in msg.tool_calls or ():
        fn = call.function
        if fn is None or not fn.name:
            raise upstream_error("upstream tool call has no function name")
        out.append((call.id, fn.name, fn.arguments or ""))
    return out


@dataclass(slots=True)
class ReasoningDelta:
    """Reasoning text (``reasoning_content`` or ``reasoning``)."""

    text: str


@dataclass(slots=True)
class TextDelta:
    """Answer text (``content``)."""

    text: str


@dataclass(slots=True)
class RefusalDelta:
    """Refusal text (``refusal``)."""

    text: str


@dataclass(slots=True)
class ToolCallStart:
    """Tool call ``index`` (the upstream's ``tool_calls[].index``) begins."""

    index: int
    call_id: str
    name: str


@dataclass(slots=True)
class ToolCallArgs:
    """A fragment of tool call ``index``'s JSON arguments."""

    index: int
    fragment: str


@dataclass(slots=True)
class Finish:
    """The ``finish_reason`` (and the stop string matched, if the upstream says)."""

    reason: str
    matched_stop: str | None


@dataclass(slots=True)
class UsageUpdate:
    """Token usage (the last one reported counts)."""

    usage: ChatUsage


#: What :meth:`ChatChunkReader.feed` returns, in stream order.
ChunkOp: TypeAlias = (
    ReasoningDelta | TextDelta | RefusalDelta | ToolCallStart | ToolCallArgs | Finish | UsageUpdate
)


@dataclass(slots=True)
class _PendingCall:
    call_id: str | None = None
    name: str | None = None
    buffered: str = ""
    started: bool = False


class ChatChunkReader:
    """Turns ``chat.completion.chunk`` dicts into :data:`ChunkOp` lists.

    Only choice 0 is read. A tool call starts (:class:`ToolCallStart`) once its name is known;
    argument fragments that arrive before the name are buffered and released right after the
    start. A tool call without an ``id`` gets ``call_id_prefix + <random>``. Non-empty content
    after ``finish_reason`` is a protocol violation (502); a repeated ``finish_reason`` is ignored.
    """

    def __init__(self, call_id_prefix: str) -> None:
        self._call_id_prefix = call_id_prefix
        self._calls: dict[int, _PendingCall] = {}
        self.model: str | None = None
        self.created: int | None = None
        self.usage: ChatUsage | None = None
        self.finish_reason: str | None = None
        self.matched_stop: str | None = None
        self.chunks = 0

    def feed(self, chunk: object) -> list[ChunkOp]:
        """Parse one chunk; raises :class:`TranslationError` if it is malformed or reports an
        upstream error."""
        reply = parse_chat_reply(chunk)
        self.chunks += 1
        if self.model is None and reply.model:
            self.model = reply.model
        if self.created is None and reply.created is not None:
            self.created = int(reply.created)
        ops: list[ChunkOp] = []
        choice = first_choice(reply)
        if choice is not None and choice.delta is not None:
            self._read_delta(choice.delta, ops)
        if choice is not None and choice.finish_reason and self.finish_reason is None:
            self.finish_reason = choice.finish_reason
            self.matched_stop = matched_stop(choice)
            ops.append(Finish(choice.finish_reason, self.matched_stop))
        if reply.usage is not None:
            self.usage = reply.usage
            ops.append(UsageUpdate(reply.usage))
        return ops

    def _read_delta(self, delta: ChatMessage, ops: list[ChunkOp]) -> None:
        start = len(ops)
        reasoning = reasoning_text(delta)
        if reasoning:
            ops.append(ReasoningDelta(reasoning))
        text = content_text(delta.content)
        if text:
            ops.append(TextDelta(text))
        if delta.refusal:
            ops.append(RefusalDelta(delta.refusal))
        for position, call in enumerate(delta.tool_calls or ()):
            self._read_tool_call(position, call, ops)
        if self.finish_reason is not None and len(ops) > start:
            raise upstream_error("upstream sent content after finish_reason")

    def _read_tool_call(self, position: int, call: ChatToolCall, ops: list[ChunkOp]) -> None:
        index = call.index if call.index is not None else position
        state = self._calls.setdefault(index, _PendingCall())
        if call.id and state.call_id is None:
            state.call_id = call.id
        fn = call.function
        if fn is not None and fn.name and state.name is None:
            state.name = fn.name
        fragment = fn.arguments if fn is not None and fn.arguments else ""
        if state.started:
            if fragment:
                ops.append(ToolCallArgs(index, fragment))
            return
        state.buffered += fragment
        if state.name is not None:
            state.started = True
            call_id = state.call_id or new_id(self._call_id_prefix)
            state.call_id = call_id
            ops.append(ToolCallStart(index, call_id, state.name))
            if state.buffered:
                ops.append(ToolCallArgs(index, state.buffered))
                state.buffered = ""

    def end(self) -> None:
        """Check end-of-stream: every tool call got a name and a ``finish_reason`` arrived.
        Raises a 502 :class:`TranslationError` otherwise."""
        if any(not state.started for state in self._calls.values()):
            raise upstream_error("upstream stream ended with a tool call that has no name")
        if self.finish_reason is None:
            raise upstream_error("upstream stream ended without a finish_reason")


# ---------------------------------------------------------------------------------------------
# Requests: the messages list
# ---------------------------------------------------------------------------------------------


def without_none(**fields: Any) -> dict[str, Any]:
    """The fields that are not ``None``, in the order given (the JSON object keeps it)."""
    return {name: value for name, value in fields.items() if value is not None}


def function_tool(
    name: str, description: str | None, parameters: dict[str, Any] | None, strict: bool | None
) -> dict[str, Any]:
    """A Chat Completions ``function`` tool (fields that are ``None`` left out)."""
    fn = without_none(name=name, description=description, parameters=parameters, strict=strict)
    return {"type": "function", "function": fn}


def chat_request(
    *,
    model: str | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    max_tokens: int | None,
    stop: list[str] | None,
    temperature: float | None,
    top_p: float | None,
    reasoning_effort: str | None,
    response_format: dict[str, Any] | None,
    user: str | None,
    stream: bool,
) -> dict[str, Any]:
    """A Chat Completions create body, in this field order; fields that are ``None`` are left
    out, ``tool_choice`` and ``parallel_tool_calls`` too when there are no tools (Chat
    Completions rejects them then), and a stream asks for usage in its last chunk."""
    chat = without_none(model=model, messages=messages)
    if tools:
        chat["tools"] = tools
        chat |= without_none(tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
    chat |= without_none(
        max_tokens=max_tokens,
        stop=stop,
        temperature=temperature,
        top_p=top_p,
        reasoning_effort=reasoning_effort,
        response_format=response_format,
        user=user,
    )
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


class ChatMessagesBuilder:
    """Accumulates Chat Completions messages for both request translators.

    * system texts seen before any other message are merged into one leading system message
      (joined with a blank line); later ones stay in place;
    * consecutive user turns are merged into one (Anthropic merges them too; several open-model
      chat templates insist on alternating roles), as are consecutive assistant turns;
    * tool calls join the preceding assistant turn (or open one);
    * tool messages stay contiguous after it; images returned by tools (tool messages are
      text-only in Chat Completions) follow them in one user message;
    * reasoning from the client's history rides on the assistant message it precedes, as both
      ``reasoning`` (read by vLLM >= 0.11) and ``reasoning_content`` (vLLM 0.10, and what chat
      templates such as Qwen3's and DeepSeek's read); reasoning that no assistant message follows
      is dropped.
    """

    def __init__(self) -> None:
        self.system_prefix: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self._tool_images: list[dict[str, Any]] = []
        self._reasoning: list[str] = []

    def reasoning(self, text: str) -> None:
        """Reasoning the model produced before the next assistant message (or tool call)."""
        if text:
            self._reasoning.append(text)

    def _open_assistant(self, content: str | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        self.messages.append(msg)
        self._attach_reasoning(msg)
        return msg

    def _attach_reasoning(self, msg: dict[str, Any]) -> None:
        if not self._reasoning:
            return
        before = msg.get("reasoning_content")
        text = "\n".join(([before] if before else []) + self._reasoning)
        msg["reasoning"] = msg["reasoning_content"] = text
        self._reasoning = []

    def _flush_tool_images(self) -> None:
        if self._tool_images:
            note = {"type": "text", "text": "Images returned by the tool calls above:"}
            self.messages.append({"role": "user", "content": [note, *self._tool_images]})
            self._tool_images = []

    def _last(self, role: str) -> dict[str, Any] | None:
        if self.messages and self.messages[-1]["role"] == role:
            return self.messages[-1]
        return None

    def system(self, text: str) -> None:
        if not self.messages and not self._tool_images:
            self.system_prefix.append(text)
        else:
            self._flush_tool_images()
            self.messages.append({"role": "system", "content": text})

    def user(self, content: str | list[dict[str, Any]]) -> None:
        self._flush_tool_images()
        self._reasoning = []  # reasoning with no answer after it belongs to no message
        last = self._last("user")
        if last is None:
            self.messages.append({"role": "user", "content": content})
            return
        before, after = last["content"], content
        if isinstance(before, str) and isinstance(after, str):
            last["content"] = f"{before}\n{after}" if before and after else before or after
        else:
            last["content"] = _as_parts(before) + _as_parts(after)

    def assistant(self, text: str) -> None:
        self._flush_tool_images()
        last = self._last("assistant")
        if last is None:
            self._open_assistant(text)
            return
        self._attach_reasoning(last)
        if text:
            before = last["content"]
            last["content"] = f"{before}\n{text}" if before else text

    def tool_call(self, call_id: str, name: str, arguments: str) -> None:
        self._flush_tool_images()
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        last = self._last("assistant")
        if last is None:
            self._open_assistant(None)["tool_calls"] = [call]
            return
        self._attach_reasoning(last)
        last.setdefault("tool_calls", []).append(call)
        if last["content"] == "":
            last["content"] = None

    def tool_result(self, call_id: str, text: str, images: list[dict[str, Any]]) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        self._tool_images.extend(images)

    def build(self) -> list[dict[str, Any]]:
        self._flush_tool_images()
        head = [{"role": "system", "content": "\n\n".join(self.system_prefix)}]
        return (head if self.system_prefix else []) + self.messages


def _as_parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content
