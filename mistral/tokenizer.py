"""The sentencepiece tokenizer of Mistral models, with a streaming decoder."""

from __future__ import annotations

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
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def control_id(self, piece: str) -> int | None:
        """The id of a control piece such as "[INST]" (v3 tokenizers), or None for plain text."""
        token = self.sp.piece_to_id(piece)
        return token if token != self.sp.unk_id() and self.sp.is_control(token) else None

    def decoder(self, after: list[int] | None = None) -> IncrementalDecoder:
        return IncrementalDecoder(self, after)


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces for streaming.

    Text is held back while it ends in an incomplete UTF-8 sequence (byte-fallback pieces arrive one
    byte at a time), and each piece is decoded in the context of the token before it, so a word's
    leading space is never dropped. ``after`` gives tokens already shown (a chat's history), so the
    first new word keeps its space.
    """

    def __init__(self, tokenizer: Tokenizer, after: list[int] | None = None) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(after[-1:]) if after else []
        self.prefix = 0  # ids[prefix:read] is the context already shown
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (maybe empty)."""
        self.ids.append(token)
        shown = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(shown):
            return ""  # an incomplete character, or a token that adds no text yet
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end shows as U+FFFD)."""
        shown = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(shown) :]
