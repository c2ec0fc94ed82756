"""Anthropic Messages API ⇄ Chat Completions.

Pure and sans-IO:

* :func:`messages_to_chat` turns a ``POST /v1/messages`` body into a Chat Completions body;
* :func:`chat_to_message` turns a ``chat.completion`` into an Anthropic ``Message``;
* :func:`count_tokens_estimate` answers ``POST /v1/messages/count_tokens`` with an estimate.

The streamed side is :class:`~pqe2ee.proxy.translate.streams.MessagesStreamTranslator`
(it shares :func:`stop_fields` and :func:`usage_object`); the Chat Completions side is
:mod:`pqe2ee.proxy.translate.chat`.

Where the APIs do not map 1:1:

* ``system`` text blocks are joined with a blank line into one leading system message.
* ``role: "system"`` messages inside ``messages`` (Claude Code sends them: beta
  ``mid-conversation-*``) are folded the way open-model chat templates accept: before any turn
  they join the system prompt; later, their text is wrapped in ``<system-reminder>`` tags and
  appended to the user turn they follow (after a user turn or its tool results) or, after an
  assistant turn, to the next user turn (after its tool results, so tool messages stay right
  after the tool calls) - many templates refuse a system message anywhere but first.
* A user turn's ``tool_result`` blocks become ``tool`` messages placed *before* the rest of that
  turn (Chat Completions needs tool messages right after the assistant's tool calls). Tool
  results are text-only in Chat Completions: their text blocks are joined with newlines, images
  are forwarded in a user message right after the tool messages, and ``is_error: true`` prefixes
  the text with ``"[tool error] "``.
* Consecutive turns of the same role are merged (the Anthropic API does the same).
* ``thinking`` blocks of an assistant turn are carried to the engine: their text rides on that
  turn's assistant message as ``reasoning`` and ``reasoning_content`` (the names vLLM and the
  chat templates read; several blocks are joined with newlines, so their position between
  interleaved tool calls is not kept). Signatures are not checked or forwarded (they mean nothing
  to another model). ``redacted_thinking`` (encrypted by Anthropic), thinking in user turns and a
  turn holding only thinking are dropped. Whether the engine's chat template shows earlier
  reasoning to the model is the template's choice (many keep only the current turn's). A trailing assistant turn (prefill) is sent as an ordinary
  assistant message; the upstream may or may not continue it.
* Only custom tools (``name``/``description``/``input_schema``) exist in Chat Completions; server
  tools (``web_search_…``, ``bash_…``, ``text_editor_…``, …) are a 400 (``unsupported_tool``).
  ``tool_choice``: ``auto`` → ``"auto"``, ``any`` → ``"required"``, ``tool`` → the named
  function, ``none`` → ``"none"``; ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``
  (both only sent when there are tools: Chat Completions rejects them otherwise). ``mcp_servers``
  and ``container`` (server-side execution) are a 400 (``unsupported_parameter``).
* ``max_tokens`` is required (400 if missing), ``stop_sequences`` → ``stop``, ``top_k`` is dropped,
  ``metadata.user_id`` → ``user``. ``output_config.effort`` → ``reasoning_effort`` (``xhigh`` /
  ``max`` → ``high``); otherwise ``thinking: {type: enabled, budget_tokens: B}`` → ``low`` for
  B < 4096, ``medium`` for B < 16384, else ``high``; ``adaptive`` / ``disabled`` set nothing.
  ``output_config.format`` (JSON schema) → ``response_format``.
* Upstream reasoning (``reasoning_content`` / ``reasoning``) becomes ``thinking`` blocks (with an
  empty ``signature``) only when the request enabled thinking (``thinking.type`` ``enabled`` or
  ``adaptive``, and ``display`` not ``omitted``) — as with Anthropic, a request without thinking
  gets no thinking blocks; the reasoning is then dropped.
* Tool call arguments become ``tool_use.input``: ``""`` → ``{}``; a JSON object → that object;
  anything else (invalid JSON, a non-object) → ``{"_raw": "<the argument text>"}``, so the client
  sees a tool call that fails its schema check and can report it back to the model. (Streams
  forward argument fragments verbatim as ``input_json_delta``.)
* ``stop_reason``: ``stop`` → ``end_turn`` (``stop_sequence`` when the upstream names the matched
  stop string — vLLM ``stop_reason`` / SGLang ``matched_stop`` — and it is one of the request's
  ``stop_sequences``), ``length`` → ``max_tokens``, ``tool_calls`` → ``tool_use``,
  ``content_filter`` or a refusal → ``refusal``.
* ``usage.input_tokens`` excludes cached prompt tokens, which are reported as
  ``cache_read_input_tokens`` (Anthropic's accounting).
* The message echoes the model the *client* asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from pqe2ee._json import json_decode
from pqe2ee.proxy.translate.chat import (
    ChatMessagesBuilder,
    ChatUsage,
    chat_request,
    content_text,
    function_calls,
    function_tool,
    json_text,
    matched_stop,
    new_id,
    reasoning_text,
    reply_message,
)
from pqe2ee.proxy.translate.errors import TranslationError, convert, invalid_request

__all__ = [
    "IMAGE_TOKEN_ESTIMATE",
    "MessagesRequest",
    "chat_to_message",
    "count_tokens_estimate",
    "messages_to_chat",
    "parse_messages_request",
    "tool_input",
]

#: Tokens assumed per image or binary document by :func:`count_tokens_estimate` (Anthropic bills
#: about width*height/750 tokens per image, at most ~1600 after downscaling).
IMAGE_TOKEN_ESTIMATE = 1600


# ---------------------------------------------------------------------------------------------
# Requests: Anthropic Messages → Chat Completions
# ---------------------------------------------------------------------------------------------


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _OutputFormat(msgspec.Struct):
    type: str
    schema: dict[str, Any] | None = None


class _OutputConfig(msgspec.Struct):
    effort: str | None = None
    format: _OutputFormat | None = None


class _Message(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[Any]


class MessagesRequest(msgspec.Struct):
    """The fields of a Messages create (or count_tokens) body that the translation reads."""

    model: str | None = None
    messages: list[Any] | None = None
    max_tokens: int | None = None
    system: str | list[Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    metadata: _Metadata | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: _OutputConfig | None = None
    mcp_servers: list[Any] | None = None
    container: Any = None


class _TextBlock(msgspec.Struct):
    text: str


class _ThinkingBlock(msgspec.Struct):
    thinking: str


class _Source(msgspec.Struct):
    type: str
    media_type: str | None = None
    data: Any = None
    url: str | None = None
    content: Any = None


class _SourceBlock(msgspec.Struct):
    source: _Source


class _ToolUseBlock(msgspec.Struct):
    id: str
    name: str
    input: dict[str, Any]


class _ToolResultBlock(msgspec.Struct):
    tool_use_id: str
    content: str | list[Any] | None = None
    is_error: bool | None = None


class _Tool(msgspec.Struct):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def parse_messages_request(req: object, *, require_max_tokens: bool = True) -> MessagesRequest:
    """Validate a Messages body (the parts this module reads); raises a 400
    :class:`TranslationError`. ``require_max_tokens=False`` for count_tokens bodies."""
    if not isinstance(req, Mapping):
        raise invalid_request("request body must be a JSON object")
    parsed = convert(req, MessagesRequest)
    if parsed.messages is None:
        raise invalid_request("messages: Field required", param="messages")
    for name, value in (("mcp_servers", parsed.mcp_servers), ("container", parsed.container)):
        if value:
            raise invalid_request(
                f"{name}: server-side tools and containers are not supported by this proxy",
                param=name,
                code="unsupported_parameter",
            )
    if require_max_tokens:
        if parsed.max_tokens is None:
            raise invalid_request("max_tokens: Field required", param="max_tokens")
        if parsed.max_tokens < 1:
            raise invalid_request("max_tokens: must be at least 1", param="max_tokens")
    effort = parsed.output_config.effort if parsed.output_config is not None else None
    if effort is not None and effort not in _EFFORTS:
        raise invalid_request(
            f"output_config.effort: unknown effort {effort!r}", param="output_config.effort"
        )
    return parsed


def _blocks(content: str | list[Any], where: str) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[Mapping[str, Any]] = []
    for j, raw in enumerate(content):
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{where}[{j}]: expected an object", param=f"{where}[{j}]")
        blocks.append(raw)
    return blocks


def _unsupported_block(kind: object, where: str) -> TranslationError:
    return invalid_request(
        f"{where}: content block type {kind!r} is not supported",
        param=f"{where}.type",
        code="unsupported_content",
    )


def _image(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = convert(raw, _SourceBlock, where=where).source
    if source.type == "base64" and isinstance(source.data, str) and source.media_type:
        url = f"data:{source.media_type};base64,{source.data}"
    elif source.type == "url" and source.url:
        url = source.url
    else:
        raise invalid_request(
            f"{where}.source: image source type {source.type!r} is not supported "
            "(use base64 or url)",
            param=f"{where}.source",
            code="unsupported_content",
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _document_text(raw: Mapping[str, Any], where: str) -> str:
    source = convert(raw, _SourceBlock, where=where).source
    if source.type == "text" and isinstance(source.data, str):
        return source.data
    if source.type == "content":
        if isinstance(source.content, str):
            return source.content
        if isinstance(source.content, list):
            return "\n".join(
                convert(b, _TextBlock, where=f"{where}.source.content[{k}]").text
                for k, b in enumerate(source.content)
            )
    raise invalid_request(
        f"{where}.source: document source type {source.type!r} is not supported "
        "(only plain-text documents can be forwarded)",
        param=f"{where}.source",
        code="unsupported_content",
    )


def _tool_result(raw: Mapping[str, Any], where: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(tool_use_id, text, images) of a tool_result block."""
    block = convert(raw, _ToolResultBlock, where=where)
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(block.content, str):
        texts.append(block.content)
    else:
        for k, inner in enumerate(_blocks(block.content or [], f"{where}.content")):
            iw = f"{where}.content[{k}]"
            kind = inner.get("type")
            if kind == "text":
                texts.append(convert(inner, _TextBlock, where=iw).text)
            elif kind == "image":
                images.append(_image(inner, iw))
            elif kind == "document":
                texts.append(_document_text(inner, iw))
            else:
                raise _unsupported_block(kind, iw)
    text = "\n".join(texts) if texts else "\n".join("[image]" for _ in images)
    if block.is_error:
        text = f"[tool error] {text}"
    return block.tool_use_id, text, images


def _user_turn(out: ChatMessagesBuilder, content: str | list[Any], where: str) -> None:
    parts: list[dict[str, Any]] = []
    for j, raw in enumerate(_blocks(content, where)):
        bw = f"{where}[{j}]"
        kind = raw.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": convert(raw, _TextBlock, where=bw).text})
        elif kind == "image":
            parts.append(_image(raw, bw))
        elif kind == "document":
            parts.append({"type": "text", "text": _document_text(raw, bw)})
        elif kind == "tool_result":
            out.tool_result(*_tool_result(raw, bw))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _unsupported_block(kind, bw)
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.user("\n".join(p["text"] for p in parts))
        else:
            out.user(parts)


def _assistant_turn(out: ChatMessagesBuilder, content: str | list[Any], where: str) -> None:
    texts: list[str] = []
    calls: list[_ToolUseBlock] = []
    thoughts: list[str] = []
    for j, raw in enumerate(_blocks(content, where)):
        bw = f"{where}[{j}]"
        kind = raw.get("type")
        if kind == "text":
            texts.append(convert(raw, _TextBlock, where=bw).text)
        elif kind == "tool_use":
            calls.append(convert(raw, _ToolUseBlock, where=bw))
        elif kind == "thinking":
            thoughts.append(convert(raw, _ThinkingBlock, where=bw).thinking)
        elif kind == "redacted_thinking":
            continue
        else:
            raise _unsupported_block(kind, bw)
    if not any(texts) and not calls:
        return  # e.g. a turn holding only thinking blocks
    for thought in thoughts:
        out.reasoning(thought)
    out.assistant("\n".join(t for t in texts if t))
    for call in calls:
        out.tool_call(call.id, call.name, json_text(call.input))


def _reminder(text: str) -> str:
    if text.lstrip().startswith("<system-reminder>"):
        return text
    return f"<system-reminder>\n{text}\n</system-reminder>"


def _flush_reminders(out: ChatMessagesBuilder, pending: list[str]) -> None:
    """Mid-conversation system texts join the user turn they follow (or precede)."""
    if pending:
        out.user("\n".join(pending))
        pending.clear()


def _system_text(system: str | list[Any] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(
        convert(b, _TextBlock, where=f"system[{k}]").text for k, b in enumerate(system)
    )


def _tools(req: MessagesRequest) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for i, raw in enumerate(req.tools or ()):
        where = f"tools[{i}]"
        if not isinstance(raw, Mapping):
            raise invalid_request(f"{where}: expected an object", param=where)
        kind = raw.get("type")
        if kind not in (None, "custom"):
            raise invalid_request(
                f"{where}: tool type {kind!r} is not supported; only custom tools "
                "(name, description, input_schema) can be forwarded",
                param=f"{where}.type",
                code="unsupported_tool",
            )
        tool = convert(raw, _Tool, where=where)
        tools.append(function_tool(tool.name, tool.description, tool.input_schema, tool.strict))
    return tools


def _tool_choice(req: MessagesRequest) -> tuple[str | dict[str, Any] | None, bool | None]:
    """(chat tool_choice, parallel_tool_calls)."""
    choice = req.tool_choice
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid_request("tool_choice.name: Field required", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    raise invalid_request(f"tool_choice.type: unknown value {kind!r}", param="tool_choice.type")


def _reasoning_effort(req: MessagesRequest) -> str | None:
    if req.output_config is not None and req.output_config.effort is not None:
        return _EFFORTS[req.output_config.effort]
    thinking = req.thinking or {}
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise invalid_request(
                "thinking.budget_tokens: Field required", param="thinking.budget_tokens"
            )
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return None


def wants_thinking(req: MessagesRequest) -> bool:
    """Whether upstream reasoning should be returned as ``thinking`` blocks."""
    thinking = req.thinking or {}
    return thinking.get("type") in ("enabled", "adaptive") and thinking.get("display") != "omitted"


def messages_to_chat(req: dict[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages create body into a Chat Completions create body.

    Raises a 400 :class:`TranslationError` (``invalid_request_error``) for invalid or unsupported
    requests; see the module docstring for the mapping.
    """
    parsed = parse_messages_request(req)
    out = ChatMessagesBuilder()
    system = _system_text(parsed.system)
    if system:
        out.system(system)
    pending: list[str] = []  # mid-conversation system texts waiting for a user turn
    for i, raw in enumerate(parsed.messages or ()):
        where = f"messages[{i}]"
        msg = convert(raw, _Message, where=where)
        if msg.role == "system":
            text = _system_text(msg.content)
            if not out.messages:
                out.system(text)  # before any turn: part of the system prompt
            elif text:
                pending.append(_reminder(text))
                if out.messages[-1]["role"] != "assistant":
                    _flush_reminders(out, pending)
        elif msg.role == "user":
            _user_turn(out, msg.content, f"{where}.content")
            _flush_reminders(out, pending)
        else:
            _assistant_turn(out, msg.content, f"{where}.content")
    _flush_reminders(out, pending)
    tools = _tools(parsed)
    choice, parallel = _tool_choice(parsed)
    effort = _reasoning_effort(parsed)
    return chat_request(
        model=parsed.model,
        messages=out.build(),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        max_tokens=parsed.max_tokens,
        stop=list(parsed.stop_sequences) if parsed.stop_sequences else None,
        temperature=parsed.temperature,
        top_p=parsed.top_p,
        reasoning_effort=effort,
        response_format=_response_format(parsed),
        user=parsed.metadata.user_id if parsed.metadata is not None else None,
        stream=bool(parsed.stream),
    )


def _response_format(req: MessagesRequest) -> dict[str, Any] | None:
    """``output_config.format`` (a JSON schema) as a Chat Completions ``response_format``."""
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is None:
        return None
    if fmt.type != "json_schema" or fmt.schema is None:
        raise invalid_request(
            "output_config.format: only {type: json_schema, schema} is supported",
            param="output_config.format",
        )
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt.schema, "strict": True},
    }


# ---------------------------------------------------------------------------------------------
# Replies: Chat Completions → Anthropic Message
# ---------------------------------------------------------------------------------------------


def tool_input(arguments: str) -> dict[str, Any]:
    """``tool_use.input`` from Chat Completions ``arguments``: ``""`` → ``{}``, a JSON object →
    itself, anything else → ``{"_raw": arguments}``."""
    if not arguments.strip():
        return {}
    try:
        value = json_decode(arguments)
    except msgspec.DecodeError:
        return {"_raw": arguments}
    if isinstance(value, dict):
        return value
    return {"_raw": arguments}


def stop_fields(
    finish_reason: str | None,
    matched: str | None,
    req: MessagesRequest,
    *,
    tool_calls: bool,
    refusal: bool,
) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` of a Message (see the module docstring's mapping)."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter" or refusal:
        return "refusal", None
    if finish_reason in ("tool_calls", "function_call") or tool_calls:
        return "tool_use", None
    if matched is not None and matched in (req.stop_sequences or ()):
        return "stop_sequence", matched
    return "end_turn", None


def usage_object(usage: ChatUsage | None) -> dict[str, Any]:
    """A Message ``usage``: cached prompt tokens counted apart from ``input_tokens``."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def chat_to_message(chat: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    """Translate a ``chat.completion`` into an Anthropic ``Message``.

    ``req`` is the client's Messages body (model echo, stop sequences, thinking). Content blocks,
    in order: ``thinking`` (if enabled and the upstream reasoned), ``text`` (text and/or
    refusal), then one ``tool_use`` per tool call. Raises a 502 :class:`TranslationError` if
    ``chat`` is malformed (or the upstream's error if it reports one).
    """
    parsed = parse_messages_request(req)
    reply, choice, msg = reply_message(chat)
    content: list[dict[str, Any]] = []
    reasoning = reasoning_text(msg)
    if reasoning and wants_thinking(parsed):
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = content_text(msg.content) + (msg.refusal or "")
    if text:
        content.append({"type": "text", "text": text})
    for call_id, name, arguments in function_calls(msg):
        content.append(
            {
                "type": "tool_use",
                "id": call_id or new_id("toolu_"),
                "name": name,
                "input": tool_input(arguments),
            }
        )
    stop_reason, stop_sequence = stop_fields(
        choice.finish_reason,
        matched_stop(choice),
        parsed,
        tool_calls=bool(msg.tool_calls),
        refusal=bool(msg.refusal),
    )
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": parsed.model or reply.model or "unknown",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_object(reply.usage),
    }


# ---------------------------------------------------------------------------------------------
# count_tokens
# ---------------------------------------------------------------------------------------------


def _block_chars(block: Mapping[str, Any]) -> tuple[int, int]:
    """(characters, images) of one content block."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return (len(text) if isinstance(text, str) else 0), 0
    if kind == "image":
        return 0, 1
    if kind == "document":
        source = block.get("source")
        if isinstance(source, Mapping) and source.get("type") == "text":
            data = source.get("data")
            return (len(data) if isinstance(data, str) else 0), 0
        if isinstance(source, Mapping) and source.get("type") == "content":
            return _content_chars(source.get("content"))
        return 0, 1
    if kind == "tool_use":
        name = block.get("name")
        return (len(name) if isinstance(name, str) else 0) + len(json_text(block.get("input"))), 0
    if kind == "tool_result":
        return _content_chars(block.get("content"))
    if kind in ("thinking", "redacted_thinking"):
        return 0, 0  # earlier turns' thinking is not part of the context
    return len(json_text(block)), 0


def _content_chars(content: object) -> tuple[int, int]:
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    if isinstance(content, list):
        for block in content:
            if isinstance(block, Mapping):
                c, i = _block_chars(block)
                chars, images = chars + c, images + i
    return chars, images


def count_tokens_estimate(req: dict[str, Any]) -> dict[str, Any]:
    """Answer ``POST /v1/messages/count_tokens`` with an **estimate**, not a tokenizer count.

    The upstream model's tokenizer is not available to the proxy, so this counts characters of
    all text the model would see — system, message text, tool_use names and JSON inputs,
    tool_result text, plain-text documents, tool names, descriptions and JSON input schemas — and
    returns ``ceil(chars / 4)`` plus :data:`IMAGE_TOKEN_ESTIMATE` per image or binary document
    (at least 1). Typical English prose and code average 3–4.5 characters per token, so this
    errs on the high side. Returns ``{"input_tokens": N}``; raises a 400
    :class:`TranslationError` if the body is not a valid count_tokens request.
    """
    parsed = parse_messages_request(req, require_max_tokens=False)
    chars = len(_system_text(parsed.system))
    images = 0
    for i, raw in enumerate(parsed.messages or ()):
        msg = convert(raw, _Message, where=f"messages[{i}]")
        c, n = _content_chars(msg.content)
        chars, images = chars + c, images + n
    for i, raw in enumerate(parsed.tools or ()):
        if not isinstance(raw, Mapping):
            raise invalid_request(f"tools[{i}]: expected an object", param=f"tools[{i}]")
        if raw.get("type") in (None, "custom"):
            tool = convert(raw, _Tool, where=f"tools[{i}]")
            chars += (
                len(tool.name) + len(tool.description or "") + len(json_text(tool.input_schema))
            )
        else:
            chars += len(json_text(raw))
    return {"input_tokens": max(1, math.ceil(chars / 4) + IMAGE_TOKEN_ESTIMATE * images)}
