"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) that encode exactly as our
Tokenizer does, so transformers' AutoTokenizer and mlx-lm read a converted folder as we do.

A sentencepiece BPE model becomes a tokenizers BPE over the same pieces: the text's spaces as "▁",
one prepended, split before every "▁" (sentencepiece never merges across a word's start: "two
spaces" is ▁two ▁ ▁spaces), byte fallback. A tekken file becomes a byte-level BPE over its pattern.
Merges are derived from the ranks: each piece of more than one symbol is made by merging its two
parts that are pieces too, the pieces ranked by their ids. The control tokens are special tokens,
skipped on decode; ``split_special_tokens`` keeps "[INST]" in the input plain text, as we do.
"""

from __future__ import annotations

import base64
from typing import Any

from mistral.errors import MistralError
from mistral.tekken import Tekken
from mistral.tokenizer import SentencePiece, Tokenizer


def tokenizer_files(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    """{file name: JSON} for a Hugging Face folder holding ``tok``."""
    model = tok.model
    body = sentencepiece_json(model) if isinstance(model, SentencePiece) else tekken_json(model)
    names = {t["id"]: t["content"] for t in body["added_tokens"]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tok.bos_id],
        "eos_token": names[tok.eos_id],
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,  # "[INST]" typed in a prompt is text, not the control token
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if "<unk>" in names.values():
        config["unk_token"] = "<unk>"
    return {"tokenizer.json": body, "tokenizer_config.json": config}


def special(i: int, name: str) -> dict[str, Any]:
    return {
        "id": i,
        "content": name,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def with_bos(bos: str, bos_id: int) -> dict[str, Any]:
    """A post-processor putting BOS first, as our encode does."""
    return {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def merges(pieces: dict[str, Any], parts: dict[str, Any]) -> list[list[str]]:
    """Every (a, b) with a + b a piece and a, b in ``parts``, ranked by the piece, then the parts
    (the values are the ranks: lower merges first)."""
    found = []
    for piece, rank in pieces.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in parts and b in parts:
                found.append((rank, parts[a], parts[b], a, b))
    found.sort()
    return [[a, b] for *_, a, b in found]


def proto_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """The top-level fields of a protobuf message: varints and length-delimited bytes."""
    fields: dict[int, list[int | bytes]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= len(data):
                raise MistralError("a sentencepiece model that ends inside a field")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, kind = key >> 3, key & 7
        if kind == 0:
            fields.setdefault(number, []).append(varint())
        elif kind == 2:
            n = varint()
            fields.setdefault(number, []).append(data[i : i + n])
            i += n
        elif kind in (1, 5):  # fixed 64 / 32 bits: not among the fields read here
            i += 8 if kind == 1 else 4
        else:
            raise MistralError(f"a sentencepiece model with a protobuf field of wire type {kind}")
    return fields


def flag(fields: dict[int, list[int | bytes]], number: int, default: bool) -> bool:
    values = fields.get(number)
    return default if not values else bool(values[-1])


def sentencepiece_rules(model: SentencePiece) -> dict[str, Any]:
    """What decides how the model encodes, from its ModelProto: normalizer_spec (3: name 1,
    precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4) and trainer_spec
    (2: model_type 3, treat_whitespace_as_suffix 24, allow_whitespace_only_pieces 26)."""
    top = proto_fields(model.path.read_bytes())
    trainer = proto_fields(bytes(top.get(2, [b""])[-1]))
    normalizer = proto_fields(bytes(top.get(3, [b""])[-1]))
    if trainer.get(3, [1])[-1] != 2:
        raise MistralError(f"{model.path}: not a BPE sentencepiece model (Mistral's are)")
    if flag(trainer, 24, False):
        raise MistralError(f"{model.path}: treat_whitespace_as_suffix is not supported")
    name = bytes(normalizer.get(1, [b"nmt_nfkc"])[-1]).decode()
    return {
        "identity": name == "identity",
        "charsmap": bytes(normalizer.get(2, [b""])[-1]),
        "dummy_prefix": flag(normalizer, 3, True),
        "squeeze_spaces": flag(normalizer, 4, True),
        "whitespace_pieces": flag(trainer, 26, False),
    }


def sentencepiece_normalizer(rules: dict[str, Any]) -> dict[str, Any]:
    """sentencepiece's order: the character map, extra spaces removed, a space prepended, spaces
    as "▁"."""
    steps: list[dict[str, Any]] = []
    if not rules["identity"] and rules["charsmap"]:
        charsmap = base64.b64encode(rules["charsmap"]).decode()
        steps.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if rules["squeeze_spaces"]:
        steps.append({"type": "Strip", "strip_left": True, "strip_right": True})
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    if rules["dummy_prefix"]:
        steps.append({"type": "Prepend", "prepend": "▁"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    return {"type": "Sequence", "normalizers": steps}


def sentencepiece_json(model: SentencePiece) -> dict[str, Any]:
    sp = model.sp
    rules = sentencepiece_rules(model)
    # Words as sentencepiece splits them: each starts at a "▁", a run of them staying together
    # when whitespace-only pieces are allowed ("▁two", "▁▁spaces"; else "▁two", "▁", "▁spaces").
    words = "▁*[^▁]+|▁+" if rules["whitespace_pieces"] else "▁[^▁]*|[^▁]+"
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    controls = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    # sentencepiece merges the pair whose piece scores highest: rank by score, then by id
    plain = {
        p: (-sp.get_score(i), i)
        for p, i in vocab.items()
        if i not in controls and not sp.is_byte(i)
    }
    bos = sp.id_to_piece(model.bos_id)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(i, sp.id_to_piece(i)) for i in controls],
        "normalizer": sentencepiece_normalizer(rules),
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": words},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": with_bos(bos, model.bos_id),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges(plain, plain),
        },
    }


def byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as tokenizers' ByteLevel spells bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def tekken_json(model: Tekken) -> dict[str, Any]:
    symbols = byte_symbols()
    n = model.n_special
    spelled = ["".join(symbols[b] for b in token) for token in model.token_bytes]
    vocab = {**{name: i for i, name in enumerate(model.special)}}
    vocab |= {s: n + r for r, s in enumerate(spelled)}
    ranks = {s: r for r, s in enumerate(spelled)}
    bos = model.special[model.bos_id]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(i, name) for i, name in enumerate(model.special)],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": model.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": with_bos(bos, model.bos_id),
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,  # a whole pre-token that is a piece is that piece, as tiktoken
            "vocab": vocab,
            "merges": merges(ranks, ranks),
        },
    }
