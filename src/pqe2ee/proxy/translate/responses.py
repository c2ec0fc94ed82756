"""OpenAI Responses API ⇄ Chat Completions.

Pure and sans-IO:

* :func:`responses_to_chat` turns a ``POST /v1/responses`` body into a Chat Completions body;
* :func:`chat_to_response` turns a ``chat.completion`` into a Responses ``response`` object;
* the builders of ``response`` objects and output items, which
  :class:`~pqe2ee.proxy.translate.streams.ResponsesStreamTranslator` (the streamed
  side) shares.

The Chat Completions side (reply structs, the chunk reader, the messages builder) is
:mod:`pqe2ee.proxy.translate.chat`.

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
* ``reasoning`` input items are carried to the engine: their ``content`` (``reasoning_text``),
  or else their ``summary`` texts, ride on the assistant message that follows (its text or its
  tool calls) as ``reasoning`` and ``reasoning_content``. ``encrypted_content`` cannot be carried
  (no open engine reads it) and is ignored; reasoning that no assistant output follows is
  dropped. ``reasoning.effort`` is normalised to the efforts open
  model servers accept: ``minimal`` → ``low``, ``xhigh``/``max`` → ``high``.
* Upstream ``reasoning_content`` (or vLLM's newer ``reasoning``) becomes a ``reasoning`` output
  item with a ``reasoning_text`` content part (raw reasoning, not a summary; ``summary`` is ``[]``).
* ``finish_reason: "length"`` gives ``status: "incomplete"`` with
  ``incomplete_details.reason = "max_output_tokens"`` (``content_filter`` likewise); the stream
  then ends with ``response.incomplete`` instead of ``response.completed``.
* The response echoes the model the *client* asked for (the proxy may route it elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from pqe2ee.proxy.translate.chat import (
    ChatMessagesBuilder,
    ChatUsage,
    chat_request,
    content_text,
    function_calls,
    function_tool,
    new_id,
    reasoning_text,
    reply_message,
    without_none,
)
from pqe2ee.proxy.translate.errors import (
    TranslationError,
    convert,
    invalid_request,
)

__all__ = [
    "ResponsesRequest",
    "chat_to_response",
    "parse_responses_request",
    "response_error_code",
    "responses_to_chat",
]

# ---------------------------------------------------------------------------------------------
# Requests: Responses → Chat Completions
# ---------------------------------------------------------------------------------------------


class _Reasoning(msgspec.Struct):
    """``reasoning``: the effort and whether a summary is wanted."""

    effort: str | None = None
    summary: str | None = None


class _TextFormat(msgspec.Struct):
    """``text.format``: ``text``, ``json_object`` or a named ``json_schema``."""

    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class _TextConfig(msgspec.Struct):
    """``text``: the output format and verbosity."""

    format: _TextFormat | None = None
    verbosity: str | None = None


class _FunctionTool(msgspec.Struct):
    """A ``function`` entry of ``tools``."""

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
    """A ``message`` input item."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Any]


class _FunctionCallItem(msgspec.Struct):
    """A ``function_call`` input item: an earlier tool call."""

    call_id: str
    name: str
    arguments: str


class _FunctionCallOutputItem(msgspec.Struct):
    """A ``function_call_output`` input item: a tool call's result."""

    call_id: str
    output: str | list[Any]


class _TextPart(msgspec.Struct):
    """An ``input_text`` / ``output_text`` (or similar) content part."""

    text: str


class _RefusalPart(msgspec.Struct):
    """A ``refusal`` content part."""

    refusal: str


class _ImagePart(msgspec.Struct):
    """An ``input_image`` content part."""

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


class _ReasoningItem(msgspec.Struct):
    """A ``reasoning`` input item (ids and ``encrypted_content`` are not needed)."""

    summary: list[_TextPart] = []
    content: list[_TextPart] | None = None


def _reasoning_input(raw: Mapping[str, Any], where: str) -> str:
    """The text of a ``reasoning`` input item: its raw content, else its summary."""
    item = convert(raw, _ReasoningItem, where=where)
    parts = item.content if item.content else item.summary
    return "\n".join(p.text for p in parts if p.text)


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
            out.reasoning(_reasoning_input(raw, where))
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


def _schema_spec(fmt: _TextFormat, schema: dict[str, Any]) -> dict[str, Any]:
    """The named JSON schema of a ``json_schema`` text format (absent fields left out)."""
    return without_none(
        name=fmt.name or "response", schema=schema, description=fmt.description, strict=fmt.strict
    )


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise invalid_request("text.format.schema: field required", param="text.format.schema")
        return {"type": "json_schema", "json_schema": _schema_spec(fmt, fmt.schema)}
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
    messages = _input_messages(parsed)
    effort = parsed.reasoning.effort if parsed.reasoning is not None else None
    return chat_request(
        model=parsed.model,
        messages=messages,
        tools=[function_tool(t.name, t.description, t.parameters, t.strict) for t in tools],
        tool_choice=choice,
        parallel_tool_calls=parsed.parallel_tool_calls,
        max_tokens=parsed.max_output_tokens,
        stop=None,
        temperature=parsed.temperature,
        top_p=parsed.top_p,
        reasoning_effort=_EFFORTS[effort] if effort is not None else None,
        response_format=_response_format(parsed),
        user=parsed.user,
        stream=bool(parsed.stream),
    )


# ---------------------------------------------------------------------------------------------
# Replies: Chat Completions → Responses
# ---------------------------------------------------------------------------------------------


def usage_object(usage: ChatUsage | None) -> dict[str, Any] | None:
    """A Responses ``usage`` from a Chat Completions one (``None`` stays ``None``)."""
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


def incomplete_of(finish_reason: str | None) -> str | None:
    """``incomplete_details.reason`` for a ``finish_reason``; ``None`` when complete."""
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
        out["format"] = {"type": "json_schema", **_schema_spec(fmt, fmt.schema or {})}
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


def response_object(
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
    """A Responses ``response`` object echoing the request's settings."""
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


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A ``reasoning`` output item holding raw reasoning text."""
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def text_part(text: str) -> dict[str, Any]:
    """An ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(text: str) -> dict[str, Any]:
    """A ``refusal`` content part."""
    return {"type": "refusal", "refusal": text}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    """A ``function_call`` output item."""
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
    reply, choice, msg = reply_message(chat)
    incomplete = incomplete_of(choice.finish_reason)
    item_status = "incomplete" if incomplete is not None else "completed"
    output: list[dict[str, Any]] = []
    reasoning = reasoning_text(msg)
    if reasoning:
        output.append(reasoning_item(new_id("rs_"), reasoning, "completed"))
    text = content_text(msg.content)
    parts: list[dict[str, Any]] = []
    if text:
        parts.append(text_part(text))
    if msg.refusal:
        parts.append(refusal_part(msg.refusal))
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
    for call_id, name, arguments in function_calls(msg):
        output.append(
            function_call_item(
                new_id("fc_"), call_id or new_id("call_"), name, arguments, "completed"
            )
        )
    created = int(reply.created) if reply.created is not None else int(time.time())
    return response_object(
        parsed,
        response_id=new_id("resp_"),
        created_at=created,
        model=parsed.model or reply.model or "unknown",
        status="incomplete" if incomplete is not None else "completed",
        output=output,
        usage=usage_object(reply.usage),
        incomplete_reason=incomplete,
    )


def response_error_code(status: int) -> str:
    """A ``response.error.code`` the Responses API (and SDK) accepts, for an HTTP status."""
    if status == 429:
        return "rate_limit_exceeded"
    if 400 <= status < 500:
        return "invalid_prompt"
    return "server_error"
