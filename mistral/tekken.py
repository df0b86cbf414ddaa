"""Tekken, the byte-level BPE tokenizer of Mistral's models since Nemo: its JSON file, checked."""

from __future__ import annotations

import base64
import binascii
import codecs
from pathlib import Path

import tiktoken

from mistral.errors import MistralError
from mistral.files import read_json

VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13", "v15")
MAX_FILE_BYTES = 256 * 2**20  # the files Mistral ships are 15-20 MB

# Files of v7 and before may omit "special_tokens": then these are the first ids, the rest of the
# special range being <SPECIAL_n> (mistral-common's list for its first tekken files).
OLD_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip


class Tekken:
    """A tekken file: ``config`` (pattern, default_vocab_size, default_num_special_tokens,
    version), ``vocab`` ({rank, token_bytes (base64)} in rank order) and, from v7 on,
    ``special_tokens`` ({rank, token_str}).

    Ids 0 .. n_special - 1 are the special tokens; id n_special + r is BPE rank r, the first 256
    ranks being the single bytes (so any text encodes, no byte fallback needed). Only the first
    default_vocab_size - n_special ranks of the vocab are used. Special text in the input ("[INST]",
    "</s>") is encoded as plain text; special tokens are skipped when decoding.
    """

    def __init__(self, path: Path, size: int) -> None:
        if size > MAX_FILE_BYTES:
            raise MistralError(f"{path}: {size} bytes is too large for a tekken file")
        data = read_json(path)
        self.path = path
        config = data.get("config")
        if not isinstance(config, dict):
            raise MistralError(f"{path}: not a tekken file (no 'config' object)")
        pattern = config.get("pattern")
        total = config.get("default_vocab_size")
        self.n_special = config.get("default_num_special_tokens")
        self.version = config.get("version")
        if not isinstance(pattern, str):
            raise MistralError(f"{path}: config.pattern must be a string")
        for key, value in (
            ("default_vocab_size", total),
            ("default_num_special_tokens", self.n_special),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MistralError(
                    f"{path}: config.{key} must be a positive integer, not {value!r}"
                )
        if self.version not in VERSIONS:
            raise MistralError(f"{path}: config.version {self.version!r} is not one of {VERSIONS}")
        self.vocab_size = total
        self.pattern = pattern
        self.special = self.read_special(data.get("special_tokens"))
        self.token_bytes = self.read_vocab(data.get("vocab"), config.get("num_vocab_tokens"))
        ranks = {b: r for r, b in enumerate(self.token_bytes)}
        try:
            self.bpe = tiktoken.Encoding(
                name=path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
            )
        except ValueError as e:  # the pattern is not a regular expression tiktoken can compile
            raise MistralError(f"{path}: config.pattern: {str(e).splitlines()[0]}") from None
        self.ids = {name: i for i, name in enumerate(self.special)}
        for name in ("<s>", "</s>"):
            if name not in self.ids:
                raise MistralError(f"{path}: no special token {name}")
        self.bos_id, self.eos_id = self.ids["<s>"], self.ids["</s>"]

    def read_special(self, listed: object) -> list[str]:
        """The names of ids 0 .. n_special - 1."""
        path = self.path
        if listed is None:
            if VERSIONS.index(self.version) > VERSIONS.index("v7"):
                raise MistralError(f"{path}: a {self.version} file must list its special_tokens")
            names = list(OLD_SPECIAL_TOKENS)
        else:
            if not isinstance(listed, list):
                raise MistralError(f"{path}: special_tokens must be a list")
            names = []
            for i, entry in enumerate(listed):
                if not isinstance(entry, dict) or entry.get("rank") != i:
                    raise MistralError(f"{path}: special_tokens[{i}] is not {{rank: {i}, ...}}")
                if not isinstance(entry.get("token_str"), str):
                    raise MistralError(f"{path}: special_tokens[{i}] has no token_str")
                names.append(entry["token_str"])
        if len(names) > self.n_special:
            raise MistralError(
                f"{path}: {len(names)} special tokens, more than default_num_special_tokens "
                f"({self.n_special})"
            )
        names += [f"<SPECIAL_{i}>" for i in range(len(names), self.n_special)]
        if len(set(names)) != len(names):
            raise MistralError(f"{path}: special token names are not unique")
        return names

    def read_vocab(self, vocab: object, declared: object) -> list[bytes]:
        """The bytes of BPE ranks 0 .. vocab_size - n_special - 1, in rank order."""
        path = self.path
        n = self.vocab_size - self.n_special
        if not isinstance(vocab, list):
            raise MistralError(f"{path}: vocab must be a list")
        if isinstance(declared, int) and len(vocab) > declared:
            raise MistralError(
                f"{path}: vocab has {len(vocab)} entries, more than num_vocab_tokens ({declared})"
            )
        if not 256 <= n <= len(vocab):
            raise MistralError(
                f"{path}: default_vocab_size {self.vocab_size} with {self.n_special} special "
                f"tokens needs {n} BPE entries (at least the 256 bytes); vocab has {len(vocab)}"
            )
        out = []
        for rank, entry in enumerate(vocab[:n]):
            if not isinstance(entry, dict) or entry.get("rank") != rank:
                raise MistralError(f"{path}: vocab[{rank}] is not {{rank: {rank}, ...}}")
            try:
                token = base64.b64decode(entry.get("token_bytes"), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise MistralError(f"{path}: vocab[{rank}].token_bytes is not base64") from None
            if rank < 256 and token != bytes([rank]):
                raise MistralError(f"{path}: vocab[{rank}] must be the single byte {rank}")
            if not token:
                raise MistralError(f"{path}: vocab[{rank}] is empty")
            out.append(token)
        if len(set(out)) != len(out):
            raise MistralError(f"{path}: vocab has the same bytes at two ranks")
        return out

    def encode(self, text: str) -> list[int]:
        return [self.n_special + r for r in self.bpe.encode_ordinary(text)]

    def decode(self, ids: list[int]) -> str:
        """Each run of BPE ids between special tokens is decoded on its own, as mistral-common
        does (a character cut by a special token shows as U+FFFD)."""
        text, run = [], []
        for i in [*checked(ids, self.vocab_size), 0]:  # id 0 (special) ends the last run
            if i >= self.n_special:
                run.append(self.token_bytes[i - self.n_special])
            elif run:
                text.append(b"".join(run).decode("utf-8", "replace"))
                run = []
        return "".join(text)

    def control_id(self, piece: str) -> int | None:
        return self.ids.get(piece)

    def decoder(self, after: list[int] | None = None) -> ByteDecoder:
        return ByteDecoder(self, after)


def checked(ids: list[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:  # a model with a larger vocabulary than its tokenizer sampled one of its own
        raise MistralError(f"token id {bad[0]} is outside the tokenizer's {vocab_size}")
    return ids


class ByteDecoder:
    """Streams the text of tekken ids: bytes go through an incremental UTF-8 decoder, which holds
    back an unfinished character (1-3 bytes) until it completes, and a special token ends the
    run as ``decode`` ends it. The pieces join to ``decode`` of the whole; linear in the length.
    ``after`` gives tokens already shown: their last few may hold the start of a character."""

    def __init__(self, tekken: Tekken, after: list[int] | None = None) -> None:
        self.tekken = tekken
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for token in (after or [])[-4:]:  # an unfinished character is at most the last 3 bytes
            self.push(token)

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (maybe empty)."""
        (token,) = checked([token], self.tekken.vocab_size)
        if token < self.tekken.n_special:
            return self.flush()
        return self.utf8.decode(self.tekken.token_bytes[token - self.tekken.n_special])

    def flush(self) -> str:
        """Whatever is held back (an unfinished character shows as U+FFFD)."""
        text = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return text
