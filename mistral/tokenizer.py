"""Mistral's tokenizers, sentencepiece and tekken, behind one interface with a streaming decoder."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError
from mistral.files import regular_file
from mistral.tekken import VERSIONS, ByteDecoder, Tekken, checked


class Tokenizer:
    """A tokenizer file of either kind, told apart by its contents: a tekken JSON file
    (mistral/tekken.py) or a sentencepiece model. ``encode`` puts BOS first and takes special
    text ("[INST]", "</s>") as plain text; ``decode`` skips control tokens; ``version`` is the
    instruct format the file declares (v1 ... v13, mistral/templates.py)."""

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise MistralError(f"tokenizer not found: {path}")
        size = regular_file(path)
        with path.open("rb") as f:
            head = f.read(64).lstrip()
        self.model: SentencePiece | Tekken = (
            Tekken(path, size) if head.startswith(b"{") else SentencePiece(path)
        )
        self.path = path

    @property
    def kind(self) -> str:
        return "tekken" if isinstance(self.model, Tekken) else "sentencepiece"

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def bos_id(self) -> int:
        return self.model.bos_id

    @property
    def eos_id(self) -> int:
        return self.model.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise MistralError(f"text to encode must be a str, not a {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (argv, a file)
            raise MistralError("the text is not valid UTF-8") from None
        return [self.bos_id] * bos + self.model.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    def control_id(self, piece: str) -> int | None:
        """The id of a control token such as "[INST]", or None when the vocabulary has none."""
        return self.model.control_id(piece)

    def decoder(self, after: list[int] | None = None) -> IncrementalDecoder | ByteDecoder:
        """A streaming decoder; ``after`` gives the tokens already shown (a prompt)."""
        return self.model.decoder(after)


class SentencePiece:
    """A sentencepiece model; ``decode`` is sentencepiece's (it drops the text's first space)."""

    def __init__(self, path: Path) -> None:
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MistralError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    @functools.cached_property
    def version(self) -> str:
        """As mistral-common reads it, from the name's suffix (tokenizer.model.v3; v7m1 is v7
        with images); a name without one (tokenizer.model) from the vocabulary instead:
        [SYSTEM_PROMPT] v7, [INST] v3, neither v1 (mistral-common would say v1)."""
        suffix = re.search(r"\.model\.(v\d+)(m\d+)?$", self.path.name)
        if suffix and suffix.group(1) in VERSIONS:
            return suffix.group(1)
        if self.control_id("[SYSTEM_PROMPT]") is not None:
            return "v7"
        return "v3" if self.control_id("[INST]") is not None else "v1"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(checked(ids, self.vocab_size))

    def control_id(self, piece: str) -> int | None:
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
    """Turns a growing list of sentencepiece ids into text pieces for streaming, equal in the
    end to ``decode`` of the whole list.

    Each new piece is decoded after the token before it, both behind a fixed anchor piece (a
    letter), so that sentencepiece's dropping of a text's leading space never hits a space in the
    middle (a lone "▁" token, a word's leading space). Text ending in an incomplete UTF-8 sequence
    is held back while it can still complete (1-3 bytes), so each push decodes a few tokens: linear
    in the length, also on runs of bytes that never form a character. ``after`` gives
    tokens already shown (a prompt, a chat's history), so the first new word keeps its space.
    """

    def __init__(self, model: SentencePiece, after: list[int] | None = None) -> None:
        self.model = model
        self.ids: list[int] = list(after[-1:]) if after else []
        self.prefix = 0  # ids[prefix:read] is the context already shown
        self.read = len(self.ids)

    def texts(self) -> tuple[str, str]:
        """The text of the context, and of the context and what follows it. With no context
        (the start of the text) exactly as ``decode`` gives it, leading space dropped."""
        context, new = self.ids[self.prefix : self.read], self.ids[self.read :]
        if not context:
            return "", self.model.decode(new)
        anchor = [self.model.anchor]
        start = len(self.model.decode(anchor))
        shown = self.model.decode(anchor + context)[start:]
        return shown, self.model.decode(anchor + context + new)[start:]

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
