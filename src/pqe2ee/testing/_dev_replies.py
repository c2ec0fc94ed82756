"""What the dev engine answers: the reply *plan* derived from a request (text pieces, finish
reason, usage, tool call, reasoning), rendered as a whole body or as vLLM-shaped SSE events.

Pure functions of the request (and the wall clock for ``created``); the ASGI app around them is
:mod:`pqe2ee.testing.dev_engine`, whose docstring describes the behaviour.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

REASONING_MODELS: frozenset[str] = frozenset({"dev-reason"})
MAX_MODEL_LEN = 32768
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
SLOW_CHUNK_DELAY = 0.2
SLOW_WORDS = 50
TRIGGER_ERROR_500 = "__error_500__"
TRIGGER_SLOW = "__slow__"
TRIGGER_TOOL = "__tool__"

_WORD_RE = re.compile(r"\s*\S+")
_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)
_PLACE_RE = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")
_CAPITAL_RE = re.compile(r"\b[A-Z][\w'-]*")
# ``__tool__ NAME {json arguments}`` on one line of a user message: a scripted tool call.
_SCRIPTED_RE = re.compile(r"__tool__[ \t]+([\w.:-]+)[ \t]+(\{[^\n]*\})")

_JSON = msgspec.json.Encoder()


# --------------------------------------------------------------------------------------------
# errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "BadRequestError")


# --------------------------------------------------------------------------------------------
# text helpers


def _pieces(text: str) -> list[str]:
    """Split ``text`` into word tokens whose concatenation is exactly ``text``."""
    pieces = _WORD_RE.findall(text)
    tail = text[sum(len(p) for p in pieces) :]
    if tail and pieces:
        pieces[-1] += tail
    return pieces


def _count_words(text: str) -> int:
    return len(text.split())


def hex_id(*parts: bytes, n: int = 32) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:n]


def _content_text(content: Any, where: str) -> tuple[str, int]:
    """Return (text, number of non-text parts) of a message ``content`` value."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        others = 0
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"{where}: each content part must be an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(f"{where}: a text content part needs a string 'text'")
                texts.append(text)
            else:
                others += 1
        return "\n".join(texts), others
    raise bad_request(f"{where}: content must be a string, a list of parts or null")


def _json_object_text(obj: dict[str, str]) -> str:
    """``{"k": "v"}`` with a space after ':' and ',' (the way models usually write it)."""
    items = ", ".join(
        f"{_JSON.encode(k).decode()}: {_JSON.encode(v).decode()}" for k, v in obj.items()
    )
    return "{" + items + "}"


def _tool_arguments(tool: dict[str, Any], text: str) -> str:
    function = tool.get("function")
    params = function.get("parameters") if isinstance(function, dict) else None
    key = "city"
    if isinstance(params, dict):
        required = params.get("required")
        props = params.get("properties")
        if isinstance(required, list) and required and isinstance(required[0], str):
            key = required[0]
        elif isinstance(props, dict) and props:
            key = str(next(iter(props)))
    value = "Paris"
    m = _PLACE_RE.search(text)
    if m:
        value = m.group(1)
    else:
        capitals = [w for w in _CAPITAL_RE.findall(text)[1:] if w.lower() != "weather"]
        if capitals:
            value = capitals[-1]
    return _json_object_text({key: value.strip("?!.,;:")})


# --------------------------------------------------------------------------------------------
# generation plan


@dataclass
class _Piece:
    kind: str  # "reasoning" | "content" | "tool_name" | "tool_args"
    text: str


@dataclass
class Plan:
    model: str
    request_id: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    chunk_delay: float
    pieces: list[_Piece] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_reason: str | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    reasoning_field: str = "reasoning_content"  # vLLM 0.10; newer vLLM names it "reasoning"

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self, completion_tokens: int | None = None) -> dict[str, int]:
        done = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + done,
            "completion_tokens": done,
        }

    def text_of(self, kind: str) -> str:
        return "".join(p.text for p in self.pieces if p.kind == kind)


def _build_pieces(
    plan: Plan,
    *,
    reasoning: str | None,
    content: str,
    tool: tuple[str, str, str, bool] | None,
    max_tokens: int,
    stops: Sequence[str],
) -> None:
    """Fill ``plan.pieces`` / finish fields. ``tool`` is (id, name, arguments, named)."""
    seq: list[_Piece] = []
    if reasoning is not None:
        seq += [_Piece("reasoning", p) for p in _pieces(reasoning)]
    natural_finish = "stop"
    stop_hit: str | None = None
    if tool is not None:
        call_id, name, arguments, named = tool
        plan.tool_call_id, plan.tool_name = call_id, name
        seq.append(_Piece("tool_name", name))
        seq += [_Piece("tool_args", p) for p in _pieces(arguments)]
        natural_finish = "stop" if named else "tool_calls"
    else:
        cut = len(content)
        for stop in stops:
            idx = content.find(stop)
            if idx != -1 and idx < cut:
                cut, stop_hit = idx, stop
        seq += [_Piece("content", p) for p in _pieces(content[:cut])]
    if len(seq) > max_tokens:
        plan.pieces = seq[:max_tokens]
        plan.finish_reason = "length"
    else:
        plan.pieces = seq
        plan.finish_reason = natural_finish
        plan.stop_reason = stop_hit


def _check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("Field 'model' is required and must be a non-empty string")
    return model


def _check_model_known(model: str, models: Sequence[str]) -> None:
    if model not in models:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"Field '{name}' must be a positive integer")
    return value


def _common_options(body: dict[str, Any]) -> tuple[bool, bool, bool, list[str]]:
    """Validate the shared knobs; return (stream, include_usage, continuous, stops)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request("The dev engine only supports n=1")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("Field 'stream' must be a boolean")
    opts = body.get("stream_options")
    include_usage = continuous = False
    if opts is not None:
        if not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.")
        if not isinstance(opts, dict):
            raise bad_request("Field 'stream_options' must be an object")
        include_usage = bool(opts.get("include_usage"))
        # As in vLLM: continuous usage only applies when include_usage is on.
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("Field 'stop' must be a string or a list of strings")
    return stream, include_usage, continuous, [s for s in stops if s]


def _check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    wanted = prompt_tokens + (max_tokens or 0)
    if prompt_tokens >= max_model_len or wanted > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {wanted} tokens ({prompt_tokens} in the messages, {max_tokens or 0} "
            "in the completion). Please reduce the length of the messages or completion."
        )
    return max_tokens if max_tokens is not None else max_model_len - prompt_tokens


def _slow_text(text: str) -> str:
    return "Echo: " + text + "".join(f" tick{i}" for i in range(1, SLOW_WORDS + 1))


def _triggered(text: str) -> bool:
    """The test triggers: ``__error_500__`` fails the request, ``__slow__`` answers slowly."""
    if text == TRIGGER_ERROR_500:
        raise ApiError(
            500,
            "Simulated engine failure (dev engine trigger __error_500__)",
            "InternalServerError",
        )
    return text == TRIGGER_SLOW


def _new_plan(
    model: str,
    request_id: str,
    prompt_tokens: int,
    options: tuple[bool, bool, bool, list[str]],
    delay: float,
    *,
    slow: bool,
) -> Plan:
    stream, include_usage, continuous, _ = options
    return Plan(
        model=model,
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        chunk_delay=delay + (SLOW_CHUNK_DELAY if slow else 0.0),
    )


def _function_name(tool: object) -> str | None:
    fn = tool.get("function") if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def _scripted(
    messages: list[Any], tools: list[Any], raw: bytes
) -> tuple[str, tuple[str, str, str, bool] | None] | None:
    """The scripted tool loop: ``(content, tool call)`` when a user message holds
    ``__tool__ NAME {json}`` and NAME is one of ``tools``; else None.

    The first turn calls the tool with exactly those arguments; once a ``tool`` message follows
    the triggering user message, the answer is ``"Tool said: " + <the last tool result>`` (so
    a client that adds its own user text after the result still gets the tool's answer).
    """
    for i in range(len(messages) - 1, -1, -1):
        msg = messages[i]
        if msg.get("role") != "user":
            continue
        text, _ = _content_text(msg.get("content"), f"messages[{i}]")
        m = _SCRIPTED_RE.search(text)
        if m is None:
            continue
        name, arguments = m.group(1), m.group(2)
        if name not in {_function_name(t) for t in tools}:
            return None
        results = [r for r in messages[i + 1 :] if r.get("role") == "tool"]
        if results:
            said, _ = _content_text(results[-1].get("content"), "tool result")
            return "Tool said: " + said, None
        return "", ("call_" + hex_id(b"tool-call", raw, n=24), name, arguments, False)
    return None


_RECALL_RE = re.compile(r"(?m)^__recall__\s*$")


def _history_reasoning(msg: dict[str, Any], i: int) -> str:
    """Reasoning carried on an assistant history message (``reasoning`` wins, as in vLLM >= 0.11;
    vLLM 0.10 read ``reasoning_content``)."""
    for key in ("reasoning", "reasoning_content"):
        value = msg.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad_request(f"messages[{i}].{key} must be a string")
        if value:
            return value
    return ""


def plan_chat(
    body: dict[str, Any],
    models: Sequence[str],
    delay: float,
    raw: bytes,
    max_model_len: int = MAX_MODEL_LEN,
) -> Plan:
    model = _check_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("Field 'messages' is required and must be a non-empty list")
    options = _common_options(body)
    stops = options[3]
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise bad_request("Field 'tools' must be a list of objects")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto") and not tools:
        raise bad_request("When using `tool_choice`, `tools` must be set.")

    prompt_tokens = 0
    last_user_text = ""
    recalled: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'")
        text, others = _content_text(msg.get("content"), f"messages[{i}]")
        prompt_tokens += _count_words(text) + others
        if msg["role"] == "user":
            last_user_text = text
        elif msg["role"] == "assistant":
            thought = _history_reasoning(msg, i)
            if thought:
                recalled.append(thought)
                prompt_tokens += _count_words(thought)
    last = messages[-1]
    _check_model_known(model, models)
    limit = _check_context(prompt_tokens, max_tokens, max_model_len)

    slow = _triggered(last_user_text)

    effort = body.get("reasoning_effort")
    want_reasoning = (
        model in REASONING_MODELS
        or body.get("reasoning") is True
        or (effort is not None and effort != "none")
    )

    tool: tuple[str, str, str, bool] | None = None
    scripted = _scripted(messages, tools or [], raw)
    if scripted is not None:
        content, tool = scripted
        source = last_user_text
    elif last.get("role") == "tool":
        source, _ = _content_text(last.get("content"), f"messages[{len(messages) - 1}]")
        content = "Tool said: " + source
    elif _RECALL_RE.search(last_user_text):
        source = last_user_text
        content = "Recalled: " + (" | ".join(recalled) if recalled else "nothing")
    else:
        source = last_user_text
        content = _slow_text(source) if slow else "Echo: " + source
        if tools and tool_choice != "none":
            chosen: dict[str, Any] | None = None
            named = False
            if isinstance(tool_choice, dict):
                fn = tool_choice.get("function")
                name = fn.get("name") if isinstance(fn, dict) else None
                chosen = next(
                    (
                        t
                        for t in tools
                        if isinstance(t.get("function"), dict) and t["function"].get("name") == name
                    ),
                    None,
                )
                if chosen is None:
                    raise bad_request(f"tool_choice names a function not in 'tools': {name!r}")
                named = True
            elif tool_choice == "required" or _WEATHER_RE.search(last_user_text):
                chosen = tools[0]
            if chosen is not None:
                fn = chosen.get("function")
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    raise bad_request("Each tool needs a 'function' with a string 'name'")
                call_id = "call_" + hex_id(b"tool-call", raw, n=24)
                tool = (call_id, name, _tool_arguments(chosen, source), named)

    plan = _new_plan(
        model, "chatcmpl-" + hex_id(b"chat", raw), prompt_tokens, options, delay, slow=slow
    )
    _build_pieces(
        plan,
        reasoning=("Thinking about: " + source) if want_reasoning else None,
        content=content,
        tool=tool,
        max_tokens=limit,
        stops=stops,
    )
    return plan


def plan_completion(
    body: dict[str, Any],
    models: Sequence[str],
    delay: float,
    raw: bytes,
    max_model_len: int = MAX_MODEL_LEN,
) -> Plan:
    model = _check_model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("Field 'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        prompt = " ".join(str(t) for t in prompt)
    if not isinstance(prompt, str):
        raise bad_request("The dev engine supports one prompt: a string or a list of token ids")
    options = _common_options(body)
    stops = options[3]
    max_tokens = _int_field(body, "max_tokens")
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    prompt_tokens = _count_words(prompt)
    _check_model_known(model, models)
    limit = _check_context(prompt_tokens, max_tokens, max_model_len)
    slow = _triggered(prompt)
    plan = _new_plan(
        model, "cmpl-" + hex_id(b"completion", raw), prompt_tokens, options, delay, slow=slow
    )
    content = _slow_text(prompt) if slow else "Echo: " + prompt
    _build_pieces(plan, reasoning=None, content=content, tool=None, max_tokens=limit, stops=stops)
    return plan


# --------------------------------------------------------------------------------------------
# responses


def _head(plan: Plan, created: int, obj: str) -> dict[str, Any]:
    """The fields every body and chunk starts with."""
    return {"id": plan.request_id, "object": obj, "created": created, "model": plan.model}


def _completion_choice(text: str, finish: str | None, stop: str | None) -> dict[str, Any]:
    return {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": stop,
    }


def chat_body(plan: Plan, created: int) -> dict[str, Any]:
    reasoning = (
        plan.text_of("reasoning") if any(p.kind == "reasoning" for p in plan.pieces) else None
    )
    tool_calls: list[dict[str, Any]] = []
    content: str | None
    if plan.tool_call_id is not None:
        content = None
        if any(p.kind == "tool_name" for p in plan.pieces):
            tool_calls.append(
                {
                    "id": plan.tool_call_id,
                    "type": "function",
                    "function": {"name": plan.tool_name, "arguments": plan.text_of("tool_args")},
                }
            )
    else:
        content = plan.text_of("content")
        if reasoning is not None and not content and plan.finish_reason == "length":
            content = None
    message = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        plan.reasoning_field: reasoning,
    }
    return {
        **_head(plan, created, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**plan.usage(), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def completion_body(plan: Plan, created: int) -> dict[str, Any]:
    return {
        **_head(plan, created, "text_completion"),
        "choices": [
            {
                **_completion_choice(plan.text_of("content"), plan.finish_reason, plan.stop_reason),
                "prompt_logprobs": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**plan.usage(), "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + _JSON.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def chat_events(plan: Plan, created: int) -> AsyncIterator[bytes]:
    def chunk(choice: dict[str, Any], done: int) -> bytes:
        obj: dict[str, Any] = {
            **_head(plan, created, "chat.completion.chunk"),
            "choices": [choice],
        }
        if plan.continuous_usage:
            obj["usage"] = plan.usage(done)
        return _sse(obj)

    def choice(delta: dict[str, Any]) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

    yield chunk(choice({"role": "assistant", "content": ""}), 0)
    for done, piece in enumerate(plan.pieces, start=1):
        if plan.chunk_delay > 0:
            await anyio.sleep(plan.chunk_delay)
        delta: dict[str, Any]
        if piece.kind == "reasoning":
            delta = {plan.reasoning_field: piece.text}
        elif piece.kind == "content":
            delta = {"content": piece.text}
        elif piece.kind == "tool_name":
            delta = {
                "tool_calls": [
                    {
                        "id": plan.tool_call_id,
                        "type": "function",
                        "index": 0,
                        "function": {"name": piece.text},
                    }
                ]
            }
        else:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece.text}}]}
        yield chunk(choice(delta), done)
    final = {
        "index": 0,
        "delta": {} if plan.tool_call_id is not None else {"content": ""},
        "logprobs": None,
        "finish_reason": plan.finish_reason,
        "stop_reason": plan.stop_reason,
    }
    yield chunk(final, plan.completion_tokens)
    if plan.include_usage:
        yield _sse(
            {
                **_head(plan, created, "chat.completion.chunk"),
                "choices": [],
                "usage": plan.usage(),
            }
        )
    yield DONE


async def completion_events(plan: Plan, created: int) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None, stop: str | None, done: int) -> bytes:
        return _sse(
            {
                **_head(plan, created, "text_completion"),
                "choices": [_completion_choice(text, finish, stop)],
                "usage": plan.usage(done) if plan.continuous_usage else None,
            }
        )

    for done, piece in enumerate(plan.pieces, start=1):
        if plan.chunk_delay > 0:
            await anyio.sleep(plan.chunk_delay)
        yield chunk(piece.text, None, None, done)
    yield chunk("", plan.finish_reason, plan.stop_reason, plan.completion_tokens)
    if plan.include_usage:
        yield _sse(
            {
                **_head(plan, created, "text_completion"),
                "choices": [],
                "usage": plan.usage(),
            }
        )
    yield DONE
