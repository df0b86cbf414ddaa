"""Chat messages: read from OpenAI-style dicts, checked and merged as mistral-common does."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mistral.errors import MistralError

Role = Literal["system", "user", "assistant", "tool"]
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function names, in every version
CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # tool call ids, v3 to v11 (v13: any but "null")
NEXT_ROLES = {  # which role may follow which
    "system": ("system", "user", "assistant"),
    "user": ("system", "user", "assistant"),
    "assistant": ("user", "assistant", "tool"),
    "tool": ("user", "assistant", "tool"),
}


@dataclass
class ToolCall:
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI gives it
    id: str = "null"  # mistral-common's word for no id


@dataclass
class Message:
    role: Role
    content: str | list[int] = ""  # an assistant turn may be kept as the very tokens it sampled
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant
    tool_call_id: str | None = None  # tool: the call it answers
    name: str | None = None  # tool: the function's name (v2 shows it)


@dataclass
class Tool:
    """A function the model may call, as the [AVAILABLE_TOOLS] block lists it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # a JSON schema

    def as_json(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": function | {"parameters": self.parameters}}


def text_of(content: object, where: str, role: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts
    (joined by blank lines, as mistral-common joins them)."""
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise MistralError(f"{where}: only text content is supported, not {part!r:.60}")
            if not isinstance(part.get("text"), str):
                raise MistralError(f"{where}: a text part without a text string")
            parts.append(part["text"])
        return "\n\n".join(p for p in parts if p)
    raise MistralError(f"{where}: content must be text, not {type(content).__name__}")


def tool_call_of(call: object, where: str) -> ToolCall:
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise MistralError(f"{where}: a tool call is {{'id', 'type', 'function': {{...}}}}")
    if call.get("type", "function") != "function":
        raise MistralError(f"{where}: tool call type {call['type']!r} is not 'function'")
    function = call["function"]
    arguments = function.get("arguments")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(function.get("name"), str) or not isinstance(arguments, str | None):
        raise MistralError(f"{where}: a tool call needs a function name and JSON arguments")
    call_id = call.get("id", "null")
    if not isinstance(call_id, str):
        raise MistralError(f"{where}: tool call id must be a string")
    return ToolCall(function["name"], arguments or "{}", call_id)


def message_of(m: object, i: int) -> Message:
    """A Message, or one read from an OpenAI-style dict ("developer" is a system message)."""
    if isinstance(m, Message):
        return m
    where = f"message {i}"
    if not isinstance(m, dict):
        raise MistralError(f"{where} is not a dict with a 'role'")
    role = "system" if m.get("role") == "developer" else m.get("role")
    if role not in NEXT_ROLES:
        raise MistralError(f"{where}: unknown role {m.get('role')!r}")
    if "content" not in m and role != "assistant":
        raise MistralError(f"{where}: no 'content'")
    content = text_of(m.get("content"), where, role)
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None and not isinstance(calls, list):
        raise MistralError(f"{where}: tool_calls must be a list")
    tool_call_id, name = (m.get("tool_call_id"), m.get("name")) if role == "tool" else (None, None)
    if not isinstance(tool_call_id, str | None) or not isinstance(name, str | None):
        raise MistralError(f"{where}: tool_call_id and name must be strings")
    calls = [tool_call_of(c, where) for c in calls or []]
    return Message(role, content, calls, tool_call_id, name)


def tool_of(tool: object, i: int) -> Tool:
    """A Tool, or one read from OpenAI's {"type": "function", "function": {name, description,
    parameters}}."""
    if isinstance(tool, Tool):
        return tool
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise MistralError(f"tool {i} is not {{'type': 'function', 'function': {{...}}}}")
    f = tool.get("function")
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise MistralError(f"tool {i}: no function name")
    description = f.get("description") or ""
    parameters = f.get("parameters") or {}
    if not isinstance(description, str) or not isinstance(parameters, dict):
        raise MistralError(f"tool {i}: description must be text and parameters a JSON object")
    return Tool(f["name"], description, parameters)


def check_name(name: str | None, where: str) -> None:
    if name is not None and not NAME.match(name):
        raise MistralError(f"{where}: function name {name!r:.70} is not 1-64 of a-z A-Z 0-9 _ -")


def check_id(call_id: str | None, n: int, where: str) -> None:
    """Tool call ids from v3 on: nine letters or digits (v3-v11), any but "null" (v13)."""
    if n >= 13 and (not call_id or call_id == "null"):
        raise MistralError(f"{where}: template v{n} needs a tool call id")
    if 3 <= n < 13 and (call_id is None or not CALL_ID.match(call_id)):
        raise MistralError(f"{where}: template v{n} needs a tool call id of 9 letters or digits")


def validate(messages: list[Message], tools: list[Tool], n: int) -> None:
    """mistral-common's checks of a request (its "test" mode) for template v{n}."""
    if not messages:
        raise MistralError("a chat prompt needs at least one message")
    last, only = messages[-1].role, len(messages) == 1
    if (only and last not in ("user", "system")) or (not only and last not in ("user", "tool")):
        raise MistralError("a chat prompt must end with a user message or tool results")
    for a, b in itertools.pairwise(messages):
        if b.role not in NEXT_ROLES[a.role]:
            raise MistralError(f"a {b.role} message cannot follow a {a.role} message")
    uses_tools = tools or any(m.role == "tool" or m.tool_calls for m in messages)
    if n == 1 and uses_tools:
        raise MistralError("template v1 has no tools, tool calls or tool results")
    for i, m in enumerate(messages):
        where = f"message {i}"
        if m.role != "assistant" and not isinstance(m.content, str):
            raise MistralError(f"{where}: only an assistant turn may be given as tokens")
        if m.role == "assistant" and n < 7 and bool(m.content) == bool(m.tool_calls):
            raise MistralError(f"{where}: before v7 an assistant has either content or tool calls")
        for call in m.tool_calls:
            check_name(call.name, where)
            check_id(call.id, n, where)
        if m.role == "tool":
            check_name(m.name, where)
            check_id(m.tool_call_id, n, where)
    for i, tool in enumerate(tools):
        check_name(tool.name, f"tool {i}")
    check_results_follow_calls(messages[1:], n)  # mistral-common starts at the second


def check_results_follow_calls(messages: list[Message], n: int) -> None:
    """Each assistant turn after tool calls comes once all of them have results: counted before
    v11, matched by id from v11 on. Results still missing at the end are allowed."""
    expected: list[str] = []
    answered: list[str | None] = []
    for m in messages:
        if m.role == "tool":
            if n >= 11 and (m.tool_call_id in answered or m.tool_call_id not in expected):
                raise MistralError(f"tool result {m.tool_call_id!r} answers no open tool call")
            answered.append(m.tool_call_id)
        elif m.role == "assistant":
            if len(answered) != len(expected):
                raise MistralError("not the same number of tool calls and tool results")
            expected, answered = [c.id for c in m.tool_calls], []
            if n >= 11 and len(set(expected)) != len(expected):
                raise MistralError("two tool calls of one assistant turn have the same id")


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, the value) when ``text`` is JSON, else (False, the text)."""
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return False, text
    except RecursionError:
        raise MistralError("tool JSON is nested too deep") from None


def json_or_text(text: str) -> Any:
    """What a tool call's arguments or a tool's result stand for: JSON when they parse."""
    return parse_json(text)[1]


def normal_json(text: str) -> str:
    """JSON text rewritten as json.dumps writes it (text that is not JSON kept as it is)."""
    if not text:
        return "{}"
    ok, value = parse_json(text)
    return json.dumps(value, ensure_ascii=False) if ok else text


def joined(group: list[Message]) -> str | list[int]:
    texts = [m.content for m in group if m.content]
    if any(not isinstance(t, str) for t in texts):
        if len(group) > 1:
            raise MistralError("an assistant turn kept as tokens cannot be merged with another")
        return texts[0] if texts else ""
    return "\n\n".join(texts)  # type: ignore[arg-type]


def calls_of(group: list[Message]) -> list[ToolCall]:
    return [c for m in group for c in m.tool_calls]


def in_call_order(results: list[Message], calls: list[str]) -> list[Message]:
    """Tool results sorted by the position of their call (unknown ids last), then by arrival."""
    order = {call_id: i for i, call_id in enumerate(calls)}
    arrived = {m.tool_call_id: i for i, m in enumerate(results)}
    return sorted(
        results,
        key=lambda m: (order.get(m.tool_call_id or "null", float("inf")), arrived[m.tool_call_id]),
    )


def normalize(messages: list[Message], n: int) -> tuple[str | None, list[Message]]:
    """mistral-common's normalizer: consecutive messages of one role merge (text joined by a
    blank line, tool calls concatenated, their arguments as normal JSON); each tool result stays
    one turn (v1-v3: its content as normal JSON; v11+: in the order of the calls). Before v7 the
    system messages leave the turns and become one system prompt, and a conversation that does
    not open with a user gets an empty user turn first. Returns (system prompt, turns)."""
    groups: list[list[Message]] = []
    for m in messages:
        if groups and groups[-1][0].role == m.role:
            groups[-1].append(m)
        else:
            groups.append([m])
    turns: list[Message] = []
    system = [m.content for m in messages if m.role == "system" and m.content]
    calls: list[str] = []  # ids of the tool calls since the last tool results
    for group in groups:
        role = group[0].role
        if role == "user":
            turns.append(Message("user", joined(group)))
        elif role == "assistant":
            merged = [replace(c, arguments=normal_json(c.arguments)) for c in calls_of(group)]
            turns.append(Message("assistant", joined(group), merged))
            calls += [c.id for c in merged]
        elif role == "tool":
            results = [replace(m, content=normal_json(m.content)) if n < 7 else m for m in group]
            turns += in_call_order(results, calls) if n >= 11 else results
            calls = []
        elif n >= 7:
            turns += group
    if not turns or (n < 7 and turns[0].role != "user"):
        turns.insert(0, Message("user", ""))
    return ("\n\n".join(system) if system and n < 7 else None), turns
