"""The instruct formats v1-v13 of Mistral's tokenizers, token for token as mistral-common's.

Each version changes one thing of the one before (``B``, ``E`` are BOS and EOS):

    v1   B[INST] {system}\\n\\n{user} [/INST]{answer}E   [INST] as text, system in the first user
    v2   B[INST]{user}[/INST]{answer}E                   control tokens; the system prompt and
         [AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS] go    before the last user turn; tool calls
                                                         [TOOL_CALLS][{name, arguments}] and
         results [TOOL_RESULTS][{name, content}][/TOOL_RESULTS] only after the last user turn
    v3   calls [{name, arguments, id}], results {content, call_id}, all of the history shown
    v7   B[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]...   each system message where it stands;
         results [TOOL_RESULTS]{id}[TOOL_CONTENT]{content}[/TOOL_RESULTS]; content + calls
    v11  calls [TOOL_CALLS]{name}[CALL_ID]{id}[ARGS]{arguments}, one per call
    v13  calls [TOOL_CALLS]{name}[ARGS]{arguments}, results [TOOL_RESULTS]{content}[/TOOL_RESULTS];
         [AVAILABLE_TOOLS] before the first user turn

From v2 on an answer's trailing spaces are dropped. The messages are checked and merged first
(mistral/messages.py), as mistral-common's validator and normalizer do.
"""

from __future__ import annotations

import json

from mistral.errors import MistralError
from mistral.messages import Message, Tool, json_or_text, normalize, validate
from mistral.tokenizer import Tokenizer

TEMPLATES = ("v1", "v2", "v3", "v7", "v11", "v13")


class Template:
    """Renders conversations in one version of the format with ``tok``'s control tokens."""

    def __init__(self, tok: Tokenizer, version: str) -> None:
        if version not in TEMPLATES:
            raise MistralError(f"unknown chat template {version!r}: use one of {TEMPLATES}")
        self.tok, self.version, self.n = tok, version, int(version[1:])

    def control(self, piece: str) -> int:
        token = self.tok.control_id(piece)
        if token is None:
            raise MistralError(
                f"template {self.version} needs the control token {piece}, which "
                f"{self.tok.path.name} lacks"
            )
        return token

    def text(self, text: str) -> list[int]:
        return self.tok.encode(text, bos=False)

    def json(self, value: object) -> list[int]:
        return self.text(json.dumps(value, ensure_ascii=False))

    def encode(self, messages: list[Message], tools: list[Tool]) -> list[int]:
        validate(messages, tools, self.n)
        system, turns = normalize(messages, self.n)
        users = [i for i, m in enumerate(turns) if m.role == "user"]
        first, last = (users[0], users[-1]) if users else (-1, -1)
        if self.n == 2:
            self.check_one_result_per_call(turns[last:])
        system_at, tools_at = (first if self.n == 1 else last), (first if self.n >= 13 else last)
        ids = [self.tok.bos_id]
        for i, m in enumerate(turns):
            if m.role == "user":
                prompt = system if i == system_at else None
                ids += self.user(m.content, prompt, tools if i == tools_at else [])
            elif m.role == "assistant":
                ids += self.assistant(m, shown=i > last or self.n >= 3)
            elif m.role == "tool":
                ids += self.result(m) if i > last or self.n >= 3 else []
            else:
                ids += [self.control("[SYSTEM_PROMPT]"), *self.text(m.content)]
                ids.append(self.control("[/SYSTEM_PROMPT]"))
        return ids

    def user(self, content: str, system: str | None, tools: list[Tool]) -> list[int]:
        """Before v7 the system prompt opens the first (v1) or the last (v2, v3) user turn."""
        if system:
            content = f"{system}\n\n{content}"
        if self.n == 1:
            return self.text(f"[INST] {content} [/INST]")
        ids = []
        if tools:
            ids += [self.control("[AVAILABLE_TOOLS]"), *self.json([t.as_json() for t in tools])]
            ids.append(self.control("[/AVAILABLE_TOOLS]"))
        return [*ids, self.control("[INST]"), *self.text(content), self.control("[/INST]")]

    def assistant(self, m: Message, shown: bool) -> list[int]:
        """Text, then tool calls, then EOS; v2 drops tool calls before the last user turn."""
        if not m.content and not m.tool_calls:
            raise MistralError("an assistant turn needs content or tool calls")
        if m.tool_calls and not shown:
            return []
        ids = []
        if isinstance(m.content, list):
            ids += m.content
        elif m.content:
            ids += self.text(m.content if self.n == 1 else m.content.rstrip(" "))
        if m.tool_calls:
            ids += self.tool_calls(m)
        return [*ids, self.tok.eos_id]

    def tool_calls(self, m: Message) -> list[int]:
        if self.n < 11:  # one JSON list; ids from v3 on
            calls = []
            for c in m.tool_calls:
                call = {"name": c.name, "arguments": json_or_text(c.arguments)}
                calls.append(call | ({"id": c.id} if self.n >= 3 and c.id != "null" else {}))
            return [self.control("[TOOL_CALLS]"), *self.json(calls)]
        ids = []
        for c in m.tool_calls:
            ids += [self.control("[TOOL_CALLS]"), *self.text(c.name)]
            if self.n == 11 and c.id != "null":
                ids += [self.control("[CALL_ID]"), *self.text(c.id)]
            ids += [self.control("[ARGS]"), *self.json(json_or_text(c.arguments))]
        return ids

    def result(self, m: Message) -> list[int]:
        assert isinstance(m.content, str)
        if self.n == 2:
            inner = self.json([{"name": m.name, "content": json_or_text(m.content)}])
        elif self.n == 3:
            inner = self.json({"content": json_or_text(m.content), "call_id": m.tool_call_id})
        elif self.n < 13:
            inner = [*self.text(m.tool_call_id or ""), self.control("[TOOL_CONTENT]")]
            inner += self.text(m.content)
        else:
            inner = self.text(m.content)
        return [self.control("[TOOL_RESULTS]"), *inner, self.control("[/TOOL_RESULTS]")]

    @staticmethod
    def check_one_result_per_call(turns: list[Message]) -> None:
        """v2 shows one tool result per assistant turn (after the last user turn)."""
        results, calling = 0, False
        for m in turns:
            if m.role == "assistant":
                results, calling = 0, bool(m.tool_calls)
            elif m.role == "tool" and calling:
                results += 1
                if results > 1:
                    raise MistralError("template v2 shows one tool result per tool-calling turn")
            elif m.role != "tool":
                results, calling = 0, False
