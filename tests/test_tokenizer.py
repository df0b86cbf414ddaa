"""Our tokenizers (sentencepiece and tekken), streaming decoder and chat formats against
mistral-common's real tokenizers; hostile tekken files."""

import shutil

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral import MistralError
from mistral.chat import Message, encode_chat, template_version
from mistral.tokenizer import SentencePiece, Tokenizer
from tests.helpers import SHIPPED, TEKKEN, V1, V3, V7, mistral_common_file

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "def f(x):\n\treturn x ** 2  # squares\n\n\nprint(f(3))",
    "Café, naïve, façade, Ångström, Œuvre — “quotes” and ‘more’…",  # noqa: RUF001 - the point is unusual quotes
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷; math ∑∫√∞",
    "漢字とかな、한국어 텍스트, 中文句子。",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\r\n and   runs     of spaces",
    " ",
    "a",
    "",
    "[INST] plain text, not control tokens [/INST]</s><s>[TOOL_CALLS]<unk>",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces, zero\u200bwidth, \ufeffBOM",
    "x" * 500 + " " * 40 + "\n" * 7,
]


@pytest.fixture(scope="module", params=[V1, V3, TEKKEN])
def pair(request):
    path = mistral_common_file(request.param)
    return Tokenizer(path), MistralTokenizer.from_file(str(path))


@pytest.mark.parametrize("name", SHIPPED)
def test_encode_decode_equal_mistral_common_on_every_shipped_file(name):
    ours = Tokenizer(mistral_common_file(name))
    inner = MistralTokenizer.from_file(str(mistral_common_file(name))).instruct_tokenizer.tokenizer
    assert ours.kind == ("tekken" if name.endswith(".json") else "sentencepiece")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == inner.encode(text, bos=True, eos=False)
        assert ids[0] == ours.bos_id == inner.bos_id
        assert ours.decode(ids) == inner.decode(ids)
    assert (ours.eos_id, ours.vocab_size) == (inner.eos_id, inner.n_words)
    for piece in [*SpecialTokens, "<SPECIAL_25>", "[control_12]", "[NOT_A_TOKEN]"]:
        expected = inner.get_special_token(piece) if inner.is_special(piece) else None
        assert ours.control_id(piece) == expected, piece


@pytest.mark.parametrize("name", [V3, TEKKEN])
def test_decoding_any_ids_equals_mistral_common_control_tokens_skipped(name):
    """Random ids, special ones among them (tekken: ids below 1000; cut byte sequences)."""
    ours = Tokenizer(mistral_common_file(name))
    inner = MistralTokenizer.from_file(str(mistral_common_file(name))).instruct_tokenizer.tokenizer
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, ours.vocab_size, 12).tolist()
        ids[rng.integers(0, 12)] = int(rng.integers(0, 30))  # a special token in the middle
        assert ours.decode(ids) == inner.decode(ids)
    assert ours.decode([ours.bos_id, ours.control_id("[INST]"), ours.eos_id]) == ""
    if ours.kind == "tekken":  # a special token cutting a character: each side decodes alone
        lead, rest = [1000 + b for b in "😀".encode()[:2]], [1000 + b for b in "😀".encode()[2:]]
        for ids in ([*lead, *rest], [*lead, 3, *rest], [*lead, 0, 1000 + 0x41, *rest]):
            assert ours.decode(ids) == inner.decode(ids)


def test_streaming_decoder_never_splits_characters_or_drops_spaces(pair):
    tok, _ = pair
    for text in TEXTS:
        ids = tok.encode(text)
        decoder = tok.decoder()
        pieces = [decoder.push(t) for t in ids[1:]]
        pieces.append(decoder.flush())
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids)


def test_streamed_continuation_keeps_its_leading_space(pair):
    tok, _ = pair
    ids = tok.encode("The king said unto them, Go")
    cut = 4
    decoder = tok.decoder(after=ids[:cut])
    streamed = "".join(decoder.push(t) for t in ids[cut:]) + decoder.flush()
    assert tok.decode(ids[:cut]) + streamed == tok.decode(ids)
    assert streamed.startswith(" ")


def test_byte_pieces_wait_for_the_whole_character(pair):
    tok, _ = pair
    ids = tok.encode("👩‍👧", bos=False)
    assert len(ids) > 2  # several byte pieces per character
    decoder = tok.decoder()
    out = [decoder.push(t) for t in ids]
    assert out[0] == "" and "".join(out) + decoder.flush() == tok.decode(ids)


def reference_chat(mt: MistralTokenizer, conversation, system=None) -> list[int]:
    messages = [SystemMessage(content=system)] if system else []
    for role, text in conversation:
        messages.append(
            UserMessage(content=text) if role == "user" else AssistantMessage(content=text)
        )
    return mt.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


CONVERSATIONS = [
    [("user", "Hello!")],
    [
        ("user", "Name three rivers."),
        ("assistant", "Nile, Amazon, Yangtze."),
        ("user", "And lakes?"),
    ],
    [("user", "a"), ("assistant", "b  "), ("user", "c"), ("assistant", "d 😀"), ("user", "é\nf")],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("system", [None, "You are a careful assistant.\nAnswer briefly."])
def test_chat_prompt_equals_mistral_common(pair, conversation, system):
    tok, mt = pair
    messages = [Message(role, text) for role, text in conversation]
    assert encode_chat(tok, messages, system) == reference_chat(mt, conversation, system)


def test_template_is_read_off_the_suffix_or_else_the_vocabulary(tmp_path):
    """mistral-common reads the name's suffix; a bare tokenizer.model (mistral-common: always v1)
    is read off its control tokens."""
    assert template_version(Tokenizer(mistral_common_file(V1))) == "v1"
    assert template_version(Tokenizer(mistral_common_file(V3))) == "v3"
    for name, version in ((V1, "v1"), (V3, "v3"), (V7, "v7")):
        bare = tmp_path / name / "tokenizer.model"
        bare.parent.mkdir()
        shutil.copy(mistral_common_file(name), bare)
        assert Tokenizer(bare).version == version


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(MistralError, match="tokenizer not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(MistralError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_chat_must_end_with_a_user_turn(pair):
    tok, _ = pair
    with pytest.raises(MistralError, match="must end with a user message"):
        encode_chat(tok, [Message("user", "a"), Message("assistant", "b")])


def test_v3_template_needs_its_control_tokens():
    tok = Tokenizer(mistral_common_file(V1))
    with pytest.raises(MistralError, match="template v3 needs"):
        encode_chat(tok, [Message("user", "hi")], version="v3")


@pytest.mark.parametrize("name", [V1, V3, "embedded"])
def test_streaming_equals_decoding_the_whole_even_around_lone_spaces(name):
    """A lone "▁" piece between words (the embedded tokenizer drops it when it leads a decode)
    and a prompt before the stream: the pieces still join to decode()'s text."""
    from tests.helpers import ROOT

    path = ROOT / "mistral/default_model/tokenizer.model" if name == "embedded" else None
    tok = Tokenizer(path or mistral_common_file(name))
    space = tok.model.sp.piece_to_id("▁")
    rng = np.random.default_rng(1)
    for _ in range(100):
        prompt = rng.integers(3, tok.vocab_size, 5).tolist()
        ids = rng.integers(3, tok.vocab_size, 10).tolist()
        ids[2:2], ids[6:6] = [space], [space, space]
        decoder = tok.decoder(after=prompt)
        streamed = "".join(decoder.push(t) for t in ids) + decoder.flush()
        assert streamed == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def test_streaming_a_run_of_bytes_is_linear(monkeypatch):
    """Bytes that never form a character are let go after 4: each push decodes a few tokens."""
    tok = Tokenizer(mistral_common_file(V3))
    byte = tok.model.sp.piece_to_id("<0xE2>")
    decoded = []
    original = SentencePiece.decode
    monkeypatch.setattr(
        SentencePiece, "decode", lambda self, ids: decoded.append(len(ids)) or original(self, ids)
    )
    decoder = tok.decoder()
    text = "".join(decoder.push(byte) for _ in range(2000)) + decoder.flush()
    assert text == original(tok.model, [byte] * 2000)
    assert sum(decoded) < 30 * 2000
