"""Chat prompts in the tokenizer's own instruct format, and a chat that keeps its cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistral.errors import MistralError
from mistral.generate import Session
from mistral.messages import Message, Tool, ToolCall, message_of, tool_of
from mistral.templates import TEMPLATES, Template
from mistral.tokenizer import Tokenizer

if TYPE_CHECKING:  # mistral.api imports this module
    from mistral.api import Model

__all__ = ["TEMPLATES", "Chat", "Message", "Tool", "ToolCall", "encode_chat", "template_version"]


def template_version(tok: Tokenizer) -> str:
    """The instruct format the tokenizer file declares, as mistral-common reads it (a tekken
    file's config.version, a sentencepiece file's suffix .v3 / .v7m1, see Tokenizer.version)."""
    return tok.version


def encode_chat(
    tok: Tokenizer,
    messages: list[Message] | list[dict[str, Any]],
    system: str | None = None,
    version: str | None = None,
    tools: list[Tool] | list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt of a conversation, token for token as mistral-common's encode_chat_completion.

    ``messages`` are Messages or OpenAI-style dicts: {"role": "system" | "user" | "assistant" |
    "tool", "content": text}, an assistant's "tool_calls" ([{"id", "type": "function",
    "function": {"name", "arguments"}}]), a tool result's "tool_call_id" (and "name"). ``system``
    is a system message before them; ``tools`` the functions offered (OpenAI's {"type":
    "function", "function": {name, description, parameters}}). The conversation ends with a user
    message or tool results. A refused conversation (as mistral-common refuses it, and tools with
    v1, which it drops) raises MistralError. ``version`` overrides the tokenizer's format
    (mistral/templates.py).
    """
    version = version or template_version(tok)
    if version not in TEMPLATES:
        raise MistralError(
            f"chat template {version} (of {tok.path.name}) is not supported: use one of {TEMPLATES}"
        )
    if not isinstance(messages, list) or not isinstance(tools, list | None):
        raise MistralError("messages and tools must be lists")
    turns = [message_of(m, i) for i, m in enumerate(messages)]
    if system:
        turns.insert(0, Message("system", system))
    return Template(tok, version).encode(turns, [tool_of(t, i) for i, t in enumerate(tools or [])])


def encode_messages(tok: Tokenizer, messages: list[Message] | list[dict[str, Any]]) -> list[int]:
    """The prompt of OpenAI-style messages or Messages in the tokenizer's own format."""
    return encode_chat(tok, messages)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Chat:
    """A conversation whose tokens stay in one cache: each turn feeds only what is new.

    If the prompt changes before its end (v2, v3 move the system prompt, v2-v11 the tools, to the
    last user turn), the cache is rewound to the common prefix when the rotating buffer still holds
    what that needs, and rebuilt otherwise.
    """

    model: Model
    system: str | None = None
    version: str | None = None
    context: int = 4096  # cache length when the model has no sliding window
    tools: list[Tool] | list[dict[str, Any]] | None = None
    messages: list[Message] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    session: Session | None = None

    @property
    def tok(self) -> Tokenizer:
        return self.model.require_tokenizer()

    def reply(self, text: str, max_tokens: int = 512, **sampling) -> Iterator[str]:
        """Streams the answer to ``text``; stopping the iterator early keeps what was said."""
        self.messages.append(Message("user", text))
        prompt = encode_chat(self.tok, self.messages, self.system, self.version, self.tools)
        keep = common_prefix(self.fed, prompt)
        if self.session is None or keep == 0 or not self.session.planner.rewind([keep]):
            self.session, keep = self.model.session(1, self.context), 0
        answer: list[int] = []
        decoder = self.tok.decoder()
        steps = self.model.stream(
            [prompt[keep:]],
            max_tokens,
            eos_id=self.tok.eos_id,
            session=self.session,
            **sampling,
        )
        try:
            for (token,) in steps:
                if token is None or token == self.tok.eos_id:
                    break
                answer.append(token)
                yield decoder.push(token)
            yield decoder.flush()
        except GeneratorExit:  # the caller stopped the answer; the cache is consistent
            raise
        except BaseException:  # interrupted inside a forward: the cache may be half written
            self.session = None
            raise
        finally:
            steps.close()
            self.messages.append(Message("assistant", answer))
            # What the cache holds: the prompt and the answer, but not a last token never fed.
            fed = int(self.session.planner.lengths[0]) if self.session else 0
            self.fed = (prompt + answer)[:fed]
