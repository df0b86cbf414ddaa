"""Tekken files: told apart by contents, streamed without splitting a character, and refused in
one line naming the file when hostile."""

import json
import shutil

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral import MistralError
from mistral.tekken import MAX_FILE_BYTES, OLD_SPECIAL_TOKENS
from mistral.tokenizer import Tokenizer
from tests.helpers import TEKKEN, V3, mistral_common_file

PATTERN = json.loads(mistral_common_file(TEKKEN).read_text())["config"]["pattern"]
SPLIT = [
    "😀🎉👩‍👩‍👧 🇫🇷",
    "漢字とかな、한국어 텍스트, 中文句子。龘齉𠜎𠜱",
    "Ærøskøbing ∑∫√∞ ẞ ǅ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🂡🂱",  # noqa: RUF001 - letters outside the BMP, on purpose
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(mistral_common_file(TEKKEN))


def stream(tok, ids, after=None) -> list[str]:
    decoder = tok.decoder(after=after)
    return [decoder.push(t) for t in ids] + [decoder.flush()]


def test_the_texts_do_split_characters_across_byte_tokens(tok):
    """Else the streaming tests below would prove nothing."""
    cut = 0
    for text in SPLIT:
        for t in tok.encode(text, bos=False):
            try:
                tok.model.token_bytes[t - tok.model.n_special].decode("utf-8")
            except UnicodeDecodeError:
                cut += 1
    assert cut >= 10


@pytest.mark.parametrize("text", SPLIT)
def test_streaming_never_splits_a_character_and_equals_decode(tok, text):
    ids = tok.encode(text, bos=False)
    pieces = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "" in pieces[:-1]  # some token completed no character


def test_streaming_random_ids_with_special_tokens_equals_decode(tok):
    """Bytes that never form a character, and special tokens cutting a character (decode shows
    each cut run as U+FFFD, as mistral-common does): the stream joins to decode()."""
    rng = np.random.default_rng(0)
    byte_ids = np.arange(tok.model.n_special + 0x80, tok.model.n_special + 0x100)
    for _ in range(200):
        ids = rng.integers(0, tok.vocab_size, 16).tolist()
        ids[3:3] = rng.choice(byte_ids, 3).tolist()  # continuation and lead bytes
        ids[rng.integers(0, len(ids))] = int(rng.integers(0, 40))  # a special token
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_a_stream_after_a_cut_character_continues_where_the_last_one_stopped(tok):
    """A chat's next answer (after=history) completes a character its history began."""
    ids = tok.encode("a😀b中c", bos=False)
    for k in range(len(ids) + 1):
        shown = "".join(stream(tok, ids[:k])[:-1])  # what was printed, held bytes not flushed
        assert shown + "".join(stream(tok, ids[k:], after=ids[:k])) == tok.decode(ids)


def test_streaming_a_run_of_bytes(tok):
    byte = tok.model.n_special + 0xE2
    assert "".join(stream(tok, [byte] * 2000)) == tok.decode([byte] * 2000) == "\ufffd" * 2000


def test_ids_outside_the_vocabulary_are_named(tok):
    with pytest.raises(MistralError, match="token id 131072 is outside"):
        tok.decode([5, 131072])
    with pytest.raises(MistralError, match="token id -1 is outside"):
        tok.decoder().push(-1)


def test_the_kind_is_read_from_the_contents_not_the_name(tmp_path):
    shutil.copy(mistral_common_file(TEKKEN), tmp_path / "tokenizer.model")
    shutil.copy(mistral_common_file(V3), tmp_path / "tekken.json")
    assert Tokenizer(tmp_path / "tokenizer.model").kind == "tekken"
    assert Tokenizer(tmp_path / "tekken.json").kind == "sentencepiece"


def small_file(**changes) -> dict:
    """A valid tekken file of 20 special tokens (the old fixed list) and 260 BPE entries."""
    merges = [b"ab", b"abc", b"  ", b"\xe4\xb8"]
    tokens = [bytes([i]) for i in range(256)] + merges
    vocab = [{"rank": i, "token_bytes": base64(t), "token_str": None} for i, t in enumerate(tokens)]
    config = {
        "pattern": PATTERN,
        "num_vocab_tokens": len(vocab),
        "default_vocab_size": len(OLD_SPECIAL_TOKENS) + len(vocab),
        "default_num_special_tokens": len(OLD_SPECIAL_TOKENS),
        "version": "v3",
    }
    return {"config": config | changes.pop("config", {}), "vocab": vocab} | changes


def base64(data: bytes) -> str:
    import base64 as b64

    return b64.b64encode(data).decode()


def test_a_small_file_equals_mistral_common(tmp_path):
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(small_file()))
    ours, ref = Tokenizer(path), Tekkenizer.from_file(path)
    for text in ["abcab  ab", "中文 é", "[INST]</s>", ""]:
        assert ours.encode(text) == ref.encode(text, bos=True, eos=False)
        assert ours.decode(ours.encode(text)) == text
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (ref.n_words, ref.bos_id, ref.eos_id)


def special(names: list[str]) -> list[dict]:
    return [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)]


def mutated(mutate) -> dict:
    data = small_file()
    mutate(data)
    return data


def swap_ranks(data: dict) -> None:
    data["vocab"][300 - 40]["rank"], data["vocab"][257]["rank"] = 257, 300 - 40


HOSTILE = [
    (b'{"config": "\xff\xfe"}', "cannot read JSON"),
    (b'{"config": {', "cannot read JSON"),
    (b"{" + b"[" * 100_000, "cannot read JSON"),
    ({"vocab": []}, "no 'config' object"),
    (small_file(config={"pattern": 5}), "config.pattern must be a string"),
    (small_file(config={"pattern": "(unclosed"}), "config.pattern: "),
    (small_file(config={"default_vocab_size": "big"}), "default_vocab_size must be a positive"),
    (small_file(config={"default_num_special_tokens": -3}), "default_num_special_tokens must be"),
    (small_file(config={"version": "v99"}), "config.version 'v99' is not one of"),
    (small_file(config={"default_vocab_size": 10**12}), "needs 999999999980 BPE entries"),
    (small_file(config={"default_vocab_size": 200}), r"needs 180 BPE entries \(at least"),
    (small_file(config={"num_vocab_tokens": 100}), "vocab has 260 entries, more than"),
    (small_file(vocab={"not": "a list"}), "vocab must be a list"),
    (mutated(lambda d: d["vocab"][257].update(token_bytes="!!not base64!!")), "not base64"),
    (mutated(lambda d: d["vocab"][257].update(token_bytes="eHl6*")), "not base64"),  # xyz, and *
    (mutated(lambda d: d["vocab"][257].update(token_bytes=None)), "not base64"),
    (mutated(lambda d: d["vocab"][10].update(token_bytes=base64(b"z"))), "the single byte 10"),
    (mutated(lambda d: d["vocab"][258].update(token_bytes=base64(b"ab"))), "same bytes"),
    (mutated(lambda d: d["vocab"][258].update(token_bytes="")), r"vocab\[258\] is empty"),
    (mutated(lambda d: d["vocab"].insert(5, d["vocab"].pop(9))), r"vocab\[5\] is not"),
    (mutated(lambda d: d["vocab"].__setitem__(7, "x")), r"vocab\[7\] is not"),
    (small_file(config={"version": "v11"}), "a v11 file must list its special_tokens"),
    (small_file(special_tokens=special(["<s>"] * 21)), "21 special tokens, more than"),
    (small_file(special_tokens=special(["<s>", "</s>", "<s>"])), "names are not unique"),
    (small_file(special_tokens=special(["<unk>", "</s>"])), "no special token <s>"),
    (small_file(special_tokens=[{"rank": 1, "token_str": "<s>"}]), r"special_tokens\[0\] is not"),
    (small_file(special_tokens=[{"rank": 0}]), r"special_tokens\[0\] has no token_str"),
    (small_file(special_tokens="<s>"), "special_tokens must be a list"),
]


@pytest.mark.parametrize("content, why", HOSTILE)
def test_hostile_files_are_refused_in_one_line_naming_the_file(tmp_path, content, why):
    path = tmp_path / "tekken.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(MistralError, match=why) as e:
        Tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "tekken.json"
    with path.open("wb") as f:
        f.write(b"{")
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(MistralError, match="too large for a tekken file"):
        Tokenizer(path)


def test_special_tokens_listed_by_the_file_are_used(tmp_path):
    """A v7+ file lists its special tokens: ids and names come from the list, the rest of the
    special range is <SPECIAL_n>, none of them decodes to text."""
    path = tmp_path / "tekken.json"
    names = ["<unk>", "[INST]", "<s>", "</s>", "[ARGS]"]
    path.write_text(
        json.dumps(small_file(special_tokens=special(names), config={"version": "v13"}))
    )
    tok = Tokenizer(path)
    assert (tok.version, tok.bos_id, tok.eos_id, tok.control_id("[ARGS]")) == ("v13", 2, 3, 4)
    assert tok.control_id("[/INST]") is None and tok.control_id("<SPECIAL_7>") == 7
    assert tok.decode([2, 4, 7, 20 + 256, 3]) == "ab"
    assert tok.encode("[ARGS]") == [2, *[20 + b for b in b"[ARGS]"]]


def test_a_model_folder_finds_its_tekken_json_first(tmp_path):
    from mistral.checkpoint import DEFAULT_MODEL, read_checkpoint

    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)  # it has a tokenizer.model
    shutil.copy(mistral_common_file(TEKKEN), folder / "tekken.json")
    assert read_checkpoint(folder).tokenizer_path == folder / "tekken.json"
