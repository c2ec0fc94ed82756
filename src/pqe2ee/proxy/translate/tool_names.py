"""Responses tools that Chat Completions has no word for: namespaces and hosted tools.

Pure and sans-IO. :func:`prepare_responses` rewrites a Responses create body *before*
:func:`~pqe2ee.proxy.translate.responses.responses_to_chat` sees it, and
:class:`ToolNames` puts the namespaces back on what comes out:

* ``{"type": "namespace", "name": NS, "tools": [function tools]}`` (Codex sends one for its
  sub-agent tools) is flattened into plain function tools. A tool keeps its own name when no
  other tool has it; on a clash every clashing tool is sent as ``NS__name`` (top-level tools
  keep theirs). The model's ``function_call`` items get their original ``name`` and
  ``"namespace": NS`` back (streamed and not); earlier ``function_call`` input items that carry
  a ``namespace`` are mapped to the flat name, as are ``tool_choice`` and ``allowed_tools``
  entries naming a namespaced function.
* Hosted tools the engine cannot run (``web_search``, ``file_search``, ``code_interpreter``,
  ``image_generation``, ``computer_use_preview``, ``mcp``, ``local_shell``, ...: any type but
  ``function`` and ``namespace``) are dropped (``hosted="drop"``, the default: the caller
  logs :attr:`Prepared.dropped`) or refused with a 400 ``unsupported_tool``
  (``hosted="refuse"``). A ``tool_choice`` naming a dropped hosted tool becomes ``"auto"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pqe2ee.proxy.translate.chat import StreamEvent
from pqe2ee.proxy.translate.errors import invalid_request

__all__ = ["HOSTED_POLICIES", "HostedPolicy", "Prepared", "ToolNames", "prepare_responses"]

HostedPolicy = Literal["drop", "refuse"]
HOSTED_POLICIES: Final = ("drop", "refuse")
_SEP: Final = "__"


@dataclass(frozen=True, slots=True)
class ToolNames:
    """Flat function name -> (namespace, original name), for the namespaced tools only."""

    by_flat: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    by_origin: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def flat(self, namespace: str, name: str) -> str:
        return self.by_origin.get((namespace, name), f"{namespace}{_SEP}{name}")

    def restore_item(self, item: Any) -> Any:
        """A ``function_call`` output item with its namespace put back (others unchanged)."""
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return item
        origin = self.by_flat.get(item.get("name"))  # type: ignore[arg-type]
        if origin is None:
            return item
        return {**item, "name": origin[1], "namespace": origin[0]}

    def restore_response(self, response: dict[str, Any]) -> dict[str, Any]:
        output = response.get("output")
        if not self.by_flat or not isinstance(output, list):
            return response
        return {**response, "output": [self.restore_item(i) for i in output]}

    def restore_event(self, event: StreamEvent) -> StreamEvent:
        name, data = event
        if not self.by_flat:
            return event
        if "item" in data:
            data = {**data, "item": self.restore_item(data["item"])}
        if isinstance(data.get("response"), dict):
            data = {**data, "response": self.restore_response(data["response"])}
        return name, data


@dataclass(frozen=True, slots=True)
class Prepared:
    """The rewritten request, the name map, and the hosted tool types dropped from it."""

    req: dict[str, Any]
    names: ToolNames
    dropped: tuple[str, ...]


def _flatten(
    tools: list[Any], hosted: HostedPolicy
) -> tuple[list[Any], ToolNames, list[str], set[str]]:
    """(function tools, names, dropped hosted types, names of dropped hosted tools)."""
    top: list[Any] = []
    nested: list[tuple[str, Mapping[str, Any]]] = []
    dropped: list[str] = []
    for i, raw in enumerate(tools):
        kind = raw.get("type") if isinstance(raw, Mapping) else None
        if kind == "namespace":
            ns, inner = raw.get("name"), raw.get("tools")
            if not isinstance(ns, str) or not ns or not isinstance(inner, list):
                raise invalid_request(
                    f"tools[{i}]: a namespace needs a name and a tools list", param=f"tools[{i}]"
                )
            for j, tool in enumerate(inner):
                if not isinstance(tool, Mapping) or tool.get("type") != "function":
                    raise invalid_request(
                        f"tools[{i}].tools[{j}]: only function tools can be in a namespace",
                        param=f"tools[{i}].tools[{j}].type",
                        code="unsupported_tool",
                    )
                nested.append((ns, tool))
        elif kind == "function" or not isinstance(raw, Mapping):
            top.append(raw)  # responses_to_chat validates it
        elif hosted == "refuse":
            raise invalid_request(
                f"tools[{i}]: hosted tool {kind!r} cannot run behind this proxy (the engine "
                "runs no hosted tools); start it with --hosted-tools drop to leave it out",
                param=f"tools[{i}].type",
                code="unsupported_tool",
            )
        else:
            dropped.append(str(kind))
    taken = [t.get("name") for t in top if isinstance(t, Mapping)]
    counts: dict[object, int] = {}
    for name in taken + [t.get("name") for _, t in nested]:
        counts[name] = counts.get(name, 0) + 1
    by_flat: dict[str, tuple[str, str]] = {}
    by_origin: dict[tuple[str, str], str] = {}
    for ns, tool in nested:
        name = str(tool.get("name"))
        flat = name if counts.get(name) == 1 else f"{ns}{_SEP}{name}"
        by_flat[flat] = (ns, name)
        by_origin[(ns, name)] = flat
        top.append({**tool, "name": flat})
    return top, ToolNames(by_flat, by_origin), dropped, set(dropped)


def _choice(choice: Any, names: ToolNames, dropped: set[str]) -> Any:
    if not isinstance(choice, Mapping):
        return choice
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("namespace"), str):
        flat = names.flat(choice["namespace"], str(choice.get("name")))
        return {"type": "function", "name": flat}
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        listed = [_choice(t, names, dropped) for t in choice["tools"]]
        kept = [t for t in listed if not (isinstance(t, Mapping) and t.get("type") in dropped)]
        return {**choice, "tools": kept}
    if kind in dropped:
        return "auto"
    return choice


def _input(items: Any, names: ToolNames) -> Any:
    if not isinstance(items, list):
        return items
    out: list[Any] = []
    for item in items:
        if (
            isinstance(item, Mapping)
            and item.get("type") == "function_call"
            and isinstance(item.get("namespace"), str)
        ):
            item = {**item, "name": names.flat(item["namespace"], str(item.get("name")))}
        out.append(item)
    return out


def prepare_responses(req: Mapping[str, Any], hosted: HostedPolicy = "drop") -> Prepared:
    """Flatten namespaces and drop (or refuse) hosted tools in a Responses create body."""
    tools = req.get("tools")
    if not isinstance(tools, list):
        return Prepared(dict(req), ToolNames(), ())
    flat, names, dropped, dropped_kinds = _flatten(tools, hosted)
    out = dict(req)
    out["tools"] = flat
    if "tool_choice" in out:
        out["tool_choice"] = _choice(out["tool_choice"], names, dropped_kinds)
    if names.by_flat and "input" in out:
        out["input"] = _input(out["input"], names)
    return Prepared(out, names, tuple(dropped))
