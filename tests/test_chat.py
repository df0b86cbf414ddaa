"""Chat: history stays in the cache across turns, and each answer is what a fresh run would give."""

import dataclasses

import pytest

import mistral
from mistral.chat import Chat, Message, encode_chat
from mistral.contract import BACKENDS
from mistral.generate import Session
from mistral.tokenizer import Tokenizer
from mistral.weights import random_weights
from tests.helpers import TEKKEN, V1, V3, V7, mistral_common_file, tiny


def model_for(tokenizer: Tokenizer, window: int | None, backend: str = "torch"):
    args = dataclasses.replace(
        tiny("tiny-window"), vocab_size=tokenizer.vocab_size, sliding_window=window
    )
    weights = random_weights(args, seed=2)
    return mistral.from_tensors(args, weights, backend, device="cpu", tokenizer=tokenizer)


@pytest.fixture
def fed(monkeypatch):
    """Records how many tokens each call of Session.feed gives the model."""
    counts: list[int] = []
    original = Session.feed

    def spy(self, rows, chunk_size, last_only):
        counts.append(sum(map(len, rows)))
        yield from original(self, rows, chunk_size, last_only)

    monkeypatch.setattr(Session, "feed", spy)
    return counts


TURNS = ["Tell me of the sea.", "And of the rivers?", "Thank you; one more word."]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, system, window",
    [
        (V1, "Be brief.", None),
        (V3, "Be brief.", None),
        (V1, None, 16),
        (V7, "Be brief.", None),
        (TEKKEN, "Be brief.", 16),
    ],
)
def test_each_answer_equals_a_fresh_greedy_run(backend, name, system, window):
    tok = Tokenizer(mistral_common_file(name))
    model = model_for(tok, window, backend)
    chat = Chat(model, system=system)
    for text in TURNS:
        answer = "".join(chat.reply(text, max_tokens=12))
        prompt = encode_chat(tok, chat.messages[:-1], system)
        fresh = model.generate([prompt], 12, eos_id=tok.eos_id)[0]
        assert chat.messages[-1].content == [t for t in fresh if t != tok.eos_id]
        assert answer == tok.decode(chat.messages[-1].content)  # streamed as a whole decode


@pytest.mark.parametrize("name", [V1, V7])
def test_only_new_tokens_are_fed_when_the_prompt_only_grows(fed, name):
    tok = Tokenizer(mistral_common_file(name))  # v1: system in the first turn; v7: before it
    chat = Chat(model_for(tok, None), system="Be brief.")
    total = 0
    for text in TURNS:
        before = len(chat.fed)
        fed.clear()
        list(chat.reply(text, max_tokens=5))
        prompt = encode_chat(tok, chat.messages[:-1], chat.system)
        assert fed[0] == len(prompt) - before  # the first feed is only what is new
        total = len(prompt)
    assert chat.session.planner.lengths[0] >= total


def test_v3_system_prompt_moves_and_the_cache_rewinds(fed):
    tok = Tokenizer(mistral_common_file(V3))  # v3 puts the system prompt in the last turn
    chat = Chat(model_for(tok, None), system="Be brief.")
    list(chat.reply(TURNS[0], max_tokens=5))
    fed.clear()
    list(chat.reply(TURNS[1], max_tokens=5))
    prompt = encode_chat(tok, chat.messages[:-1], chat.system)
    # The first turn's tokens before its system prompt are kept: less than the prompt is fed.
    assert 0 < fed[0] < len(prompt)


def test_stopping_an_answer_keeps_the_session_consistent():
    tok = Tokenizer(mistral_common_file(V1))
    model = model_for(tok, 16)
    chat = Chat(model)
    answer = chat.reply(TURNS[0], max_tokens=30)
    next(answer), next(answer)
    answer.close()  # what Ctrl-C does to the answer being printed
    assert len(chat.messages[-1].content) == 2
    list(chat.reply(TURNS[1], max_tokens=8))
    prompt = encode_chat(tok, chat.messages[:-1])
    fresh = model.generate([prompt], 8, eos_id=tok.eos_id)[0]
    assert chat.messages[-1].content == [t for t in fresh if t != tok.eos_id]


def test_messages_keep_sampled_tokens():
    tok = Tokenizer(mistral_common_file(V1))
    messages = [Message("user", "hi"), Message("assistant", [5, 6, 7]), Message("user", "ok")]
    ids = encode_chat(tok, messages)
    assert ids[ids.index(5) : ids.index(7) + 2] == [5, 6, 7, tok.eos_id]


def test_tools_offered_to_a_chat_are_in_its_prompt():
    tok = Tokenizer(mistral_common_file(V7))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    chat = Chat(model_for(tok, None), tools=[weather])
    list(chat.reply("Weather?", max_tokens=3))
    prompt = encode_chat(tok, chat.messages[:-1], tools=[weather])
    assert chat.fed[: len(prompt)] == prompt
    assert tok.control_id("[AVAILABLE_TOOLS]") in prompt
