"""Instruct prompt formats of Mistral's v1 and v3 tokenizers, and a chat that keeps its cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mistral.errors import MistralError
from mistral.generate import Session
from mistral.tokenizer import Tokenizer

if TYPE_CHECKING:  # mistral.api imports this module
    from mistral.api import Model

Role = Literal["user", "assistant"]


@dataclass
class Message:
    role: Role
    content: str | list[int]  # an assistant turn may be kept as the very tokens it sampled


def template_version(tok: Tokenizer) -> str:
    """'v3' when [INST] and [/INST] are control tokens of the vocabulary, else 'v1' (plain text)."""
    return "v3" if tok.control_id("[INST]") is not None else "v1"


def encode_chat(
    tok: Tokenizer, messages: list[Message], system: str | None = None, version: str | None = None
) -> list[int]:
    """The prompt of a conversation ending with a user turn, as Mistral's instruct tokenizers do.

    v1: ``<s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>[INST] ...`` with [INST] as plain text
    and the system prompt in the first user turn. v3: [INST] and [/INST] are control tokens and the
    system prompt goes into the last user turn.
    """
    version = version or template_version(tok)
    if version not in ("v1", "v3"):
        raise MistralError(f"unknown chat template {version!r}: use v1 or v3")
    begin, end = tok.control_id("[INST]"), tok.control_id("[/INST]")
    if version == "v3" and (begin is None or end is None):
        raise MistralError(
            f"template v3 needs [INST] and [/INST] control tokens, which {tok.path.name} "
            "lacks: use v1"
        )
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users or messages[-1].role != "user":
        raise MistralError("a chat prompt must end with a user message")
    ids = [tok.bos_id]
    for i, m in enumerate(messages):
        if m.role == "user":
            assert isinstance(m.content, str)
            text = m.content
            if system and i == (users[0] if version == "v1" else users[-1]):
                text = system + "\n\n" + text
            if version == "v1":
                ids += tok.encode(f"[INST] {text} [/INST]", bos=False)
            else:
                ids += [begin, *tok.encode(text, bos=False), end]
        elif m.role == "assistant":
            if isinstance(m.content, str):
                text = m.content if version == "v1" else m.content.rstrip(" ")
                ids += tok.encode(text, bos=False)
            else:
                ids += list(m.content)
            ids.append(tok.eos_id)
        else:
            raise MistralError(f"unknown role {m.role!r}")
    return ids


def encode_messages(tok: Tokenizer, messages: list[Message] | list[dict[str, str]]) -> list[int]:
    """The prompt of OpenAI-style messages ({"role": "system" | "user" | "assistant", "content":
    text}) or Messages, in the tokenizer's own template; a system message becomes the system
    prompt."""
    system = None
    turns = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            turns.append(m)
            continue
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise MistralError(f"message {i} is not a dict with a text 'content'")
        if m.get("role") == "system":
            system = m["content"] if system is None else f"{system}\n\n{m['content']}"
        elif m.get("role") in ("user", "assistant"):
            turns.append(Message(m["role"], m["content"]))
        else:
            raise MistralError(f"message {i}: unknown role {m.get('role')!r}")
    return encode_chat(tok, turns, system)


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

    If the prompt changes before its end (v3 moves the system prompt to the last user turn), the
    cache is rewound to the common prefix when the rotating buffer still holds what that needs, and
    rebuilt otherwise.
    """

    model: Model
    system: str | None = None
    version: str | None = None
    context: int = 4096  # cache length when the model has no sliding window
    messages: list[Message] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    session: Session | None = None

    @property
    def tok(self) -> Tokenizer:
        return self.model.require_tokenizer()

    def reply(self, text: str, max_tokens: int = 512, **sampling) -> Iterator[str]:
        """Streams the answer to ``text``; stopping the iterator early keeps what was said."""
        self.messages.append(Message("user", text))
        prompt = encode_chat(self.tok, self.messages, self.system, self.version)
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
