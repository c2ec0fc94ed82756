"""OpenAI Responses API ⇄ Chat Completions.

Three pieces, all pure and sans-IO:

* :func:`responses_to_chat` turns a ``POST /v1/responses`` body into a Chat Completions body;
* :func:`chat_to_response` turns a ``chat.completion`` into a Responses ``response`` object;
* :class:`ResponsesStreamTranslator` turns ``chat.completion.chunk`` dicts, one at a time, into
  Responses streaming events ``(event_name, data)``.

This module also holds the upstream (Chat Completions) side shared with
:mod:`pqe2ee.proxy.anthropic`: lenient msgspec structs for ``chat.completion`` /
``chat.completion.chunk`` (:func:`parse_chat_reply`) and :class:`ChatChunkReader`, which turns
chunks into a flat list of semantic operations (:data:`ChunkOp`).

Where the APIs do not map 1:1:

* The proxy is stateless: ``previous_response_id``, ``conversation``, ``background``, ``prompt``
  (stored prompt templates) and ``item_reference`` input items are refused with a 400
  (``unsupported_parameter``). ``store`` is ignored (nothing is ever stored), as are ``include``,
  ``truncation``, ``service_tier``, ``prompt_cache_key``, ``safety_identifier``, ``top_logprobs``,
  ``max_tool_calls``, ``text.verbosity`` and ``metadata`` (the latter is echoed in the response).
* Only ``function`` tools exist in Chat Completions; any other tool type is a 400
  ``unsupported_tool``. Hosted ``tool_choice`` values are a 400 ``unsupported_tool_choice``;
  ``allowed_tools`` is applied by filtering the tool list. ``tool_choice`` and
  ``parallel_tool_calls`` are only sent when there are tools (Chat Completions rejects them
  otherwise).
* ``instructions`` and any *leading* system/developer messages are merged into one leading
  ``system`` message (many open-model chat templates reject several system messages); later
  developer messages become ``system`` messages in place.
* Text-only content is sent as a string (parts joined with ``"\\n"``); content with images is
  sent as parts. Images in a ``function_call_output`` (tool messages are text-only in Chat
  Completions) are forwarded in a ``user`` message right after the tool messages.
* ``reasoning`` input items are dropped; ``reasoning.effort`` is normalised to the efforts open
  model servers accept: ``minimal`` → ``low``, ``xhigh``/``max`` → ``high``.
* Upstream ``reasoning_content`` (or vLLM's newer ``reasoning``) becomes a ``reasoning`` output
  item with a ``reasoning_text`` content part (raw reasoning, not a summary; ``summary`` is ``[]``).
* ``finish_reason: "length"`` gives ``status: "incomplete"`` with
  ``incomplete_details.reason = "max_output_tokens"`` (``content_filter`` likewise); the stream
  then ends with ``response.incomplete`` instead of ``response.completed``.
* The response echoes the model the *client* asked for (the proxy may route it elsewhere).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import msgspec

from pqe2ee.errors import LocalProtocolError
from pqe2ee.proxy.errors import (
    TranslationError,
    convert,
    invalid_request,
    upstream_error,
)

__all__ = [
    "ChatChunkReader",
    "ChatMessagesBuilder",
    "ChatReply",
    "ChatUsage",
    "ChunkOp",
    "Finish",
    "ReasoningDelta",
    "RefusalDelta",
    "ResponsesRequest",
    "ResponsesStreamTranslator",
    "StreamEvent",
    "TextDelta",
    "ToolCallArgs",
    "ToolCallStart",
    "UsageUpdate",
    "chat_to_response",
    "content_text",
    "first_choice",
    "json_text",
    "matched_stop",
    "new_id",
    "parse_chat_reply",
    "parse_responses_request",
    "reasoning_text",
    "response_error_code",
    "responses_to_chat",
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
# Upstream side: Chat Completions replies and chunks (shared with pqe2ee.proxy.anthropic)
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
    reports an error in-band, else a 502 ``server_error`` when the shape is wrong.
    """
    if not isinstance(obj, Mapping):
        raise upstream_error("upstream reply is not a JSON object")
    reported = _upstream_reported_error(obj)
    if reported is not None:
        raise reported
    try:
        return msgspec.convert(obj, ChatReply)
    except msgspec.ValidationError as exc:
        raise upstream_error(f"malformed upstream reply: {exc}") from None


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


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class RefusalDelta:
    text: str


@dataclass(slots=True)
class ToolCallStart:
    """Tool call ``index`` (the upstream's ``tool_calls[].index``) begins."""

    index: int
    call_id: str
    name: str


@dataclass(slots=True)
class ToolCallArgs:
    index: int
    fragment: str


@dataclass(slots=True)
class Finish:
    reason: str
    matched_stop: str | None


@dataclass(slots=True)
class UsageUpdate:
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
# Requests: Responses → Chat Completions
# ---------------------------------------------------------------------------------------------


class _Reasoning(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class _TextFormat(msgspec.Struct):
    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class _TextConfig(msgspec.Struct):
    format: _TextFormat | None = None
    verbosity: str | None = None


class _FunctionTool(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(msgspec.Struct):
    """The fields of a Responses create body that the translation reads (others are ignored)."""

    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    reasoning: _Reasoning | None = None
    text: _TextConfig | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None


class _MessageItem(msgspec.Struct):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Any]


class _FunctionCallItem(msgspec.Struct):
    call_id: str
    name: str
    arguments: str


class _FunctionCallOutputItem(msgspec.Struct):
    call_id: str
    output: str | list[Any]


class _TextPart(msgspec.Struct):
    text: str


class _RefusalPart(msgspec.Struct):
    refusal: str


class _ImagePart(msgspec.Struct):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


_EFFORTS = {
    "none": "none",
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def _unsupported(param: str, what: str) -> TranslationError:
    return invalid_request(
        f"{param}: {what} is not supported by this proxy",
        param=param,
        code="unsupported_parameter",
    )


def parse_responses_request(req: object) -> ResponsesRequest:
    """Validate a Responses create body (the parts this module reads). Raises a 400
    :class:`TranslationError` for bad types and for stateful features."""
    if not isinstance(req, Mapping):
        raise invalid_request("request body must be a JSON object")
    parsed = convert(req, ResponsesRequest)
    if parsed.previous_response_id is not None:
        raise invalid_request(
            "previous_response_id: this proxy is stateless and keeps no responses; "
            "send the full conversation in `input`",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    if parsed.conversation is not None:
        raise _unsupported("conversation", "server-side conversation state")
    if parsed.background:
        raise _unsupported("background", "background mode")
    if parsed.prompt is not None:
        raise _unsupported("prompt", "stored prompt templates")
    if parsed.input is None:
        raise invalid_request("input: field required", param="input")
    if parsed.reasoning is not None and parsed.reasoning.effort is not None:
        if parsed.reasoning.effort not in _EFFORTS:
            raise invalid_request(
                f"reasoning.effort: unknown effort {parsed.reasoning.effort!r}",
                param="reasoning.effort",
            )
    return parsed


def _function_tools(req: ResponsesRequest) -> list[_FunctionTool]:
    tools: list[_FunctionTool] = []
    for i, raw in enumerate(req.tools or ()):
        where = f"tools[{i}]"
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{where}: expected an object", param=where)
        kind = raw.get("type")
        if kind != "function":
            raise invalid_request(
                f"{where}: tool type {kind!r} is not supported; only function tools can be "
                "forwarded to Chat Completions",
                param=f"{where}.type",
                code="unsupported_tool",
            )
        tools.append(convert(raw, _FunctionTool, where=where))
    return tools


def _chat_tool(tool: _FunctionTool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    if tool.parameters is not None:
        fn["parameters"] = tool.parameters
    if tool.strict is not None:
        fn["strict"] = tool.strict
    return {"type": "function", "function": fn}


def _tool_choice(
    req: ResponsesRequest, tools: list[_FunctionTool]
) -> tuple[str | dict[str, Any] | None, list[_FunctionTool]]:
    """(chat tool_choice, tools to send)."""
    choice = req.tool_choice
    if choice is None:
        return None, tools
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise invalid_request(f"tool_choice: unknown value {choice!r}", param="tool_choice")
        return choice, tools
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid_request("tool_choice.name: expected a string", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}, tools
    if kind == "allowed_tools":
        mode = choice.get("mode")
        listed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(listed, list):
            raise invalid_request(
                "tool_choice: allowed_tools needs mode auto|required and a tools list",
                param="tool_choice",
            )
        names: set[object] = set()
        for entry in listed:
            if not isinstance(entry, Mapping) or entry.get("type") != "function":
                raise invalid_request(
                    "tool_choice.tools: only function tools can be allowed",
                    param="tool_choice.tools",
                    code="unsupported_tool_choice",
                )
            names.add(entry.get("name"))
        return str(mode), [t for t in tools if t.name in names]
    raise invalid_request(
        f"tool_choice: type {kind!r} is not supported; only function tools are available",
        param="tool_choice",
        code="unsupported_tool_choice",
    )


def _image_part(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    part = convert(raw, _ImagePart, where=where)
    if part.image_url is None:
        raise invalid_request(
            f"{where}: images by file_id cannot be resolved by this proxy; send image_url",
            param=where,
            code="unsupported_content",
        )
    image: dict[str, Any] = {"url": part.image_url}
    if part.detail in ("low", "high", "auto"):
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _content_parts(content: str | list[Any], where: str) -> list[dict[str, Any]]:
    """Chat content parts (``text`` / ``image_url``) of a Responses message content."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{pw}: expected an object", param=pw)
        kind = raw.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            parts.append({"type": "text", "text": convert(raw, _TextPart, where=pw).text})
        elif kind == "refusal":
            parts.append({"type": "text", "text": convert(raw, _RefusalPart, where=pw).refusal})
        elif kind == "input_image":
            parts.append(_image_part(raw, pw))
        else:
            raise invalid_request(
                f"{pw}: content type {kind!r} is not supported",
                param=f"{pw}.type",
                code="unsupported_content",
            )
    return parts


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A string when all parts are text (joined with newlines), else the parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _only_text(parts: list[dict[str, Any]], where: str, role: str) -> str:
    if any(p["type"] != "text" for p in parts):
        raise invalid_request(
            f"{where}: {role} messages can only hold text",
            param=where,
            code="unsupported_content",
        )
    return "\n".join(p["text"] for p in parts)


class ChatMessagesBuilder:
    """Accumulates Chat Completions messages for both request translators.

    * system texts seen before any other message are merged into one leading system message
      (joined with a blank line); later ones stay in place;
    * consecutive user turns are merged into one (Anthropic merges them too; several open-model
      chat templates insist on alternating roles), as are consecutive assistant turns;
    * tool calls join the preceding assistant turn (or open one);
    * tool messages stay contiguous after it; images returned by tools (tool messages are
      text-only in Chat Completions) follow them in one user message.
    """

    def __init__(self) -> None:
        self.system_prefix: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self._tool_images: list[dict[str, Any]] = []

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
            self.messages.append({"role": "assistant", "content": text})
        elif text:
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
            self.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            return
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


def _tool_output(output: str | list[Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(output, str):
        return output, []
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for j, raw in enumerate(output):
        pw = f"{where}[{j}]"
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{pw}: expected an object", param=pw)
        kind = raw.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(convert(raw, _TextPart, where=pw).text)
        elif kind == "input_image":
            images.append(_image_part(raw, pw))
        else:
            raise invalid_request(
                f"{pw}: tool output type {kind!r} is not supported",
                param=f"{pw}.type",
                code="unsupported_content",
            )
    text = "\n".join(texts) if texts else "\n".join("[image]" for _ in images)
    return text, images


def _input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out = ChatMessagesBuilder()
    if req.instructions:
        out.system(req.instructions)
    items: list[Any]
    if isinstance(req.input, str):
        items = [{"role": "user", "content": req.input}]
    else:
        items = req.input or []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{where}: expected an object", param=where)
        kind = raw.get("type", "message" if "role" in raw else None)
        if kind == "message":
            msg = convert(raw, _MessageItem, where=where)
            parts = _content_parts(msg.content, f"{where}.content")
            if msg.role in ("system", "developer"):
                out.system(_only_text(parts, f"{where}.content", msg.role))
            elif msg.role == "assistant":
                out.assistant(_only_text(parts, f"{where}.content", msg.role))
            else:
                out.user(_collapse(parts))
        elif kind == "function_call":
            call = convert(raw, _FunctionCallItem, where=where)
            out.tool_call(call.call_id, call.name, call.arguments)
        elif kind == "function_call_output":
            result = convert(raw, _FunctionCallOutputItem, where=where)
            text, images = _tool_output(result.output, f"{where}.output")
            out.tool_result(result.call_id, text, images)
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise invalid_request(
                f"{where}: item_reference needs stored items; this proxy is stateless",
                param=where,
                code="unsupported_parameter",
            )
        else:
            raise invalid_request(
                f"{where}: input item type {kind!r} is not supported",
                param=f"{where}.type",
                code="unsupported_input_item",
            )
    return out.build()


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise invalid_request("text.format.schema: field required", param="text.format.schema")
        spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema}
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": spec}
    raise invalid_request(
        f"text.format.type: {fmt.type!r} is not supported", param="text.format.type"
    )


def responses_to_chat(req: dict[str, Any]) -> dict[str, Any]:
    """Translate a Responses create body into a Chat Completions create body.

    Raises a 400 :class:`TranslationError` for invalid or unsupported requests (see the module
    docstring for what cannot be honoured).
    """
    parsed = parse_responses_request(req)
    tools = _function_tools(parsed)
    choice, tools = _tool_choice(parsed, tools)
    chat: dict[str, Any] = {}
    if parsed.model is not None:
        chat["model"] = parsed.model
    chat["messages"] = _input_messages(parsed)
    if tools:  # Chat Completions rejects tool_choice without tools
        chat["tools"] = [_chat_tool(t) for t in tools]
        if choice is not None:
            chat["tool_choice"] = choice
        if parsed.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = parsed.parallel_tool_calls
    if parsed.max_output_tokens is not None:
        chat["max_tokens"] = parsed.max_output_tokens
    if parsed.temperature is not None:
        chat["temperature"] = parsed.temperature
    if parsed.top_p is not None:
        chat["top_p"] = parsed.top_p
    if parsed.reasoning is not None and parsed.reasoning.effort is not None:
        chat["reasoning_effort"] = _EFFORTS[parsed.reasoning.effort]
    response_format = _response_format(parsed)
    if response_format is not None:
        chat["response_format"] = response_format
    if parsed.user is not None:
        chat["user"] = parsed.user
    if parsed.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# ---------------------------------------------------------------------------------------------
# Replies: Chat Completions → Responses
# ---------------------------------------------------------------------------------------------


def _usage(usage: ChatUsage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    total = usage.total_tokens
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": total
        if total is not None
        else usage.prompt_tokens + usage.completion_tokens,
    }


def _incomplete_reason(finish_reason: str | None) -> str | None:
    if finish_reason == "length":
        return "max_output_tokens"
    if finish_reason == "content_filter":
        return "content_filter"
    return None


def _echo_text(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format if req.text is not None else None
    out: dict[str, Any] = {"format": {"type": "text"}}
    if fmt is not None and fmt.type == "json_object":
        out["format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec: dict[str, Any] = {
            "type": "json_schema",
            "name": fmt.name or "response",
            "schema": fmt.schema or {},
        }
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        out["format"] = spec
    if req.text is not None and req.text.verbosity in ("low", "medium", "high"):
        out["verbosity"] = req.text.verbosity
    return out


def _echo_tool_choice(req: ResponsesRequest) -> str | dict[str, Any]:
    choice = req.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "name": choice["name"]}
    return choice


def _echo_tools(req: ResponsesRequest) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters,
            "strict": t.strict,
        }
        for t in _function_tools(req)
    ]


def _response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete_reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reasoning = None
    if req.reasoning is not None:
        summary = req.reasoning.summary
        reasoning = {
            "effort": req.reasoning.effort,
            "summary": summary if summary in ("auto", "concise", "detailed") else None,
        }
    obj: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": (
            {"reason": incomplete_reason} if incomplete_reason is not None else None
        ),
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": (
            req.parallel_tool_calls if req.parallel_tool_calls is not None else True
        ),
        "previous_response_id": None,
        "reasoning": reasoning,
        "temperature": req.temperature,
        "text": _echo_text(req),
        "tool_choice": _echo_tool_choice(req),
        "tools": _echo_tools(req),
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }
    if status == "completed":
        obj["completed_at"] = int(time.time())
    return obj


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def _function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def chat_to_response(chat: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    """Translate a ``chat.completion`` into a Responses ``response`` object.

    ``req`` is the client's Responses create body (echoed fields, model name). Output items, in
    order: a ``reasoning`` item (if the upstream returned reasoning), a ``message`` item (if it
    returned text or a refusal), then one ``function_call`` item per tool call. Raises a 502
    :class:`TranslationError` if ``chat`` is malformed (or the upstream's error if it reports one).
    """
    parsed = parse_responses_request(req)
    reply = parse_chat_reply(chat)
    choice = first_choice(reply)
    if choice is None or choice.message is None:
        raise upstream_error("upstream reply has no choices")
    msg = choice.message
    incomplete = _incomplete_reason(choice.finish_reason)
    item_status = "incomplete" if incomplete is not None else "completed"
    output: list[dict[str, Any]] = []
    reasoning = reasoning_text(msg)
    if reasoning:
        output.append(_reasoning_item(new_id("rs_"), reasoning, "completed"))
    text = content_text(msg.content)
    parts: list[dict[str, Any]] = []
    if text:
        parts.append(_text_part(text))
    if msg.refusal:
        parts.append(_refusal_part(msg.refusal))
    if parts:
        output.append(
            {
                "id": new_id("msg_"),
                "type": "message",
                "role": "assistant",
                "status": item_status,
                "content": parts,
            }
        )
    for call in msg.tool_calls or ():
        fn = call.function
        if fn is None or not fn.name:
            raise upstream_error("upstream tool call has no function name")
        output.append(
            _function_call_item(
                new_id("fc_"),
                call.id or new_id("call_"),
                fn.name,
                fn.arguments or "",
                "completed",
            )
        )
    created = int(reply.created) if reply.created is not None else int(time.time())
    return _response_object(
        parsed,
        response_id=new_id("resp_"),
        created_at=created,
        model=parsed.model or reply.model or "unknown",
        status="incomplete" if incomplete is not None else "completed",
        output=output,
        usage=_usage(reply.usage),
        incomplete_reason=incomplete,
    )


def response_error_code(status: int) -> str:
    """A ``response.error.code`` the Responses API (and SDK) accepts, for an HTTP status."""
    if status == 429:
        return "rate_limit_exceeded"
    if 400 <= status < 500:
        return "invalid_prompt"
    return "server_error"


# ---------------------------------------------------------------------------------------------
# Streaming: chat.completion.chunk → Responses events
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Part:
    kind: Literal["output_text", "refusal"]
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _text_part(self.text) if self.kind == "output_text" else _refusal_part(self.text)


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
            return _reasoning_item(self.id, self.text, self.status)
        if self.kind == "function_call":
            return _function_call_item(self.id, self.call_id, self.name, self.text, self.status)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "status": self.status,
            "content": [p.to_dict() for p in self.parts],
        }


class ResponsesStreamTranslator:
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

    def __init__(self, req: dict[str, Any]) -> None:
        self._req = parse_responses_request(req)
        self._reader = ChatChunkReader(call_id_prefix="call_")
        self.response_id = new_id("resp_")
        self._created_at = int(time.time())
        self._seq = 0
        self._started = False
        self._closed = False
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._tools: dict[int, _Item] = {}
        self.failure: TranslationError | None = None

    @property
    def closed(self) -> bool:
        """True once a terminal event (completed, incomplete or failed) was produced."""
        return self._closed

    # -- public API ---------------------------------------------------------------------------

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
        out = self.start()
        try:
            for op in self._reader.feed(chunk):
                self._apply(op, out)
        except TranslationError as exc:
            out.extend(self._fail(exc))
        return out

    def finish(self) -> list[StreamEvent]:
        """End of the upstream stream: the terminal ``response.completed`` /
        ``response.incomplete`` event (or the failure events if the stream was cut short)."""
        out = self.start()
        try:
            self._reader.end()
        except TranslationError as exc:
            out.extend(self._fail(exc))
            return out
        incomplete = _incomplete_reason(self._reader.finish_reason)
        self._close_open(out, "incomplete" if incomplete is not None else "completed")
        status = "incomplete" if incomplete is not None else "completed"
        response = self._response(status, incomplete_reason=incomplete)
        out.append(self._emit(f"response.{status}", {"response": response}))
        self._closed = True
        return out

    def error(self, status: int, type: str, message: str) -> list[StreamEvent]:
        """The upstream failed: an ``error`` event and ``response.failed``; closes the stream."""
        return self._fail(TranslationError(status, type, message))

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the Responses stream translator is closed")

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
        return _response_object(
            self._req,
            response_id=self.response_id,
            created_at=self._created_at,
            model=self._model(),
            status=status,
            output=[item.to_dict() for item in self._items],
            usage=_usage(self._reader.usage) if status != "in_progress" else None,
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

    def _apply(self, op: ChunkOp, out: list[StreamEvent]) -> None:
        if isinstance(op, ReasoningDelta):
            self._reasoning(op.text, out)
        elif isinstance(op, TextDelta):
            self._message(_Part("output_text"), op.text, out)
        elif isinstance(op, RefusalDelta):
            self._message(_Part("refusal"), op.text, out)
        elif isinstance(op, ToolCallStart):
            self._tool_start(op, out)
        elif isinstance(op, ToolCallArgs):
            self._tool_args(op, out)
        elif isinstance(op, Finish):
            status = "incomplete" if _incomplete_reason(op.reason) is not None else "completed"
            self._close_open(out, status)

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

    def _tool_start(self, op: ToolCallStart, out: list[StreamEvent]) -> None:
        self._close_open(out, "completed")
        item = self._new_item("function_call")
        item.call_id = op.call_id
        item.name = op.name
        self._tools[op.index] = item
        self._added(item, out)

    def _tool_args(self, op: ToolCallArgs, out: list[StreamEvent]) -> None:
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
