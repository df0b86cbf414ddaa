"""The sentencepiece tokenizer of Mistral models, with a streaming decoder."""

from __future__ import annotations

import functools
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError


class Tokenizer:
    """``encode`` puts BOS first; ``decode`` is sentencepiece's (it drops the first space)."""

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise MistralError(f"tokenizer not found: {path}")
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MistralError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise MistralError(f"text to encode must be a str, not a {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (argv, a file)
            raise MistralError("the text is not valid UTF-8") from None
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # a model with a larger vocabulary than its tokenizer sampled one of its own
            raise MistralError(f"token id {bad[0]} is outside the tokenizer's {self.vocab_size}")
        return self.sp.decode(ids)

    def control_id(self, piece: str) -> int | None:
        """The id of a control piece such as "[INST]" (v3 tokenizers), or None for plain text."""
        token = self.sp.piece_to_id(piece)
        return token if token != self.sp.unk_id() and self.sp.is_control(token) else None

    @functools.cached_property
    def anchor(self) -> int:
        """A piece that decodes to one letter, for IncrementalDecoder."""
        for token in range(self.vocab_size):
            piece = self.sp.id_to_piece(token)
            if len(piece) == 1 and piece.isascii() and piece.isalpha():
                return token
        raise MistralError(f"{self.path}: no single-letter piece to anchor streaming on")

    def decoder(self, after: list[int] | None = None) -> IncrementalDecoder:
        return IncrementalDecoder(self, after)


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces for streaming, equal in the end to
    ``decode`` of the whole list.

    Each new piece is decoded after the token before it, both behind a fixed anchor piece (a
    letter), so that sentencepiece's dropping of a text's leading space never hits a space in the
    middle (a lone "▁" token, a word's leading space). Text ending in an incomplete UTF-8 sequence
    is held back while it can still complete (1-3 bytes), so each push decodes a few tokens: linear
    in the length, also on runs of bytes that never form a character. ``after`` gives
    tokens already shown (a prompt, a chat's history), so the first new word keeps its space.
    """

    def __init__(self, tokenizer: Tokenizer, after: list[int] | None = None) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(after[-1:]) if after else []
        self.prefix = 0  # ids[prefix:read] is the context already shown
        self.read = len(self.ids)

    def texts(self) -> tuple[str, str]:
        """The text of the context, and of the context and what follows it. With no context
        (the start of the text) exactly as ``decode`` gives it, leading space dropped."""
        context, new = self.ids[self.prefix : self.read], self.ids[self.read :]
        if not context:
            return "", self.tok.decode(new)
        anchor = [self.tok.anchor]
        start = len(self.tok.decode(anchor))
        return self.tok.decode(anchor + context)[start:], self.tok.decode(anchor + context + new)[
            start:
        ]

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (maybe empty)."""
        self.ids.append(token)
        shown, text = self.texts()
        new = text[len(shown) :]
        incomplete = 0 < len(new) - len(new.rstrip("\ufffd")) < 4  # 1-3 bytes of a character
        if incomplete or (not new and len(self.ids) - self.read < 8):
            return ""  # a character still arriving, or tokens that add no text yet
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end shows as U+FFFD)."""
        shown, text = self.texts()
        self.prefix = self.read = len(self.ids)
        return text[len(shown) :]
