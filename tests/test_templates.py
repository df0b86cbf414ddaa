"""Chat templates v1-v13 token for token against mistral-common's encode_chat_completion, on every
tokenizer file it ships and on tekken files declared v7, v11 and v13."""

import functools
import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral import MistralError
from mistral.chat import Message, encode_chat, template_version
from mistral.tokenizer import Tokenizer
from tests.helpers import SHIPPED, TEKKEN, V1, V3, V7, mistral_common_file, tekken_as

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city — °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search-web_2", "parameters": None}}
TOOLS = [WEATHER, SEARCH]


def call(id_: str, name: str = "get_weather", arguments: object = '{"city": "Paris"}') -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text: object) -> dict:
    return {"role": "user", "content": text}


def assistant(text: object = None, calls: list | None = None) -> dict:
    return {"role": "assistant", "content": text} | ({"tool_calls": calls} if calls else {})


def result(id_: str, content: str, name: str | None = "get_weather") -> dict:
    return {"role": "tool", "tool_call_id": id_, "content": content, "name": name}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# Hand-written conversations, each aimed at one rule of some version.
PLAIN = [
    [user("Hello!")],
    [system("Be brief."), user("Name three rivers."), assistant("Nile, Amazon.  "), user("Lakes?")],
    [user("a"), assistant("b  "), user("c"), assistant("d 😀"), user("é\nf")],
    [user("first"), system("late system"), user("second")],  # v1-v3: merged into one prompt
    [system("one"), system(""), system("two"), user("hi")],
    [user("a"), user(""), user("b")],  # consecutive users merge with a blank line
    [user([{"type": "text", "text": "part 1"}, {"type": "text", "text": "part 2"}])],
    [user("[INST] not a control token </s> [/INST]"), assistant("[TOOL_CALLS]"), user("<s>")],
    [system("only a system prompt")],
    [assistant("an opening answer"), user("then a question")],
    [user("  spaces  "), assistant("  answer\t \n "), user("\n")],
    [user("x"), assistant("a"), assistant("b"), user("y")],  # consecutive answers merge
]
TOOL_USE = [
    [user("Weather in Paris?"), assistant(calls=[call("abc123XYZ")]), result("abc123XYZ", "21")],
    [
        system("You call tools."),
        user("Weather in Paris and Rome?"),
        assistant(calls=[call("abc123XYZ"), call("def456UVW", arguments={"city": "Rome"})]),
        result("def456UVW", '{"temp": 18, "sky": "pluie"}'),  # out of order: v11+ sort them
        result("abc123XYZ", "sunny"),
        assistant("Paris is sunny, Rome rainy."),
        user("Thanks. And Oslo?"),
    ],
    [
        user("q"),
        assistant(calls=[call("abc123XYZ", "search-web_2", "not json")]),
        result("abc123XYZ", "", name=None),
        user("again"),
        assistant(calls=[call("ghi789RST", arguments="")]),
        result("ghi789RST", '[1, 2, {"a": null}]'),
    ],
    [
        user("content and calls"),
        assistant("Checking. ", [call("abc123XYZ")]),  # allowed from v7 on
        result("abc123XYZ", "ok"),
    ],
    [user("q"), assistant(calls=[call("abc123XYZ")]), result("abc123XYZ", "r"), user("next")],
]
REFUSED = [  # mistral-common refuses these; so must we
    [],
    [user("q"), assistant("a")],  # must end with a user turn or tool results
    [assistant("a")],
    [user("q"), result("abc123XYZ", "r")],  # a result after no call
    [user("q"), assistant(calls=[call("bad id")]), result("bad id", "r")],
    [user("q"), assistant(calls=[call("abc123XYZ", "bad name!")]), result("abc123XYZ", "r")],
    [
        user("q"),
        assistant(calls=[call("abc123XYZ"), call("def456UVW")]),
        result("abc123XYZ", "r"),
        assistant("early"),
        user("u"),
    ],
    [user("q"), assistant(calls=[call("abc123XYZ")]), result("abc123XYZ", "r"), system("s")],
    [user("q"), assistant(""), user("r")],  # an empty answer
    [
        user("q"),
        assistant(calls=[call("abc123XYZ"), call("abc123XYZ")]),
        result("abc123XYZ", "1"),
        result("abc123XYZ", "2"),
    ],
]


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    """Tekken files declared v7, v11 and v13 (mistral-common ships none)."""
    folder = tmp_path_factory.mktemp("tekken")
    return {v: tekken_as(v, folder / f"tekken_{v}.json") for v in ("v7", "v11", "v13")}


@functools.cache
def pair(path: str) -> tuple[Tokenizer, MistralTokenizer]:
    return Tokenizer(path), MistralTokenizer.from_file(path)


def files(derived) -> list[str]:
    return [str(mistral_common_file(name)) for name in SHIPPED] + list(map(str, derived.values()))


def reference(mt: MistralTokenizer, messages: list, tools: list | None) -> list[int] | None:
    """mistral-common's prompt, or None when it refuses the conversation."""
    try:
        request = ChatCompletionRequest.from_openai(messages, tools)
        return mt.encode_chat_completion(request).tokens
    except Exception:  # its validators raise several kinds: a refusal is what matters
        return None


def ours(tok: Tokenizer, messages: list, tools: list | None) -> list[int] | None:
    try:
        return encode_chat(tok, messages, tools=tools)
    except MistralError:
        return None


def compare(path: str, conversations: list[tuple[list, list | None]]) -> tuple[int, int]:
    """Asserts that each conversation gives mistral-common's tokens (or both refuse it); returns
    how many were compared and how many of those the reference accepted."""
    tok, mt = pair(path)
    compared = agreed = 0
    for messages, tools in conversations:
        if tok.version == "v1" and (tools or any(m["role"] == "tool" for m in messages)):
            continue  # v1 has no tools: we refuse them (see test_v1_refuses_tools)
        expected = reference(mt, messages, tools)
        got = ours(tok, messages, tools)
        assert got == expected, (tok.version, messages, tools, got and mt.decode(got, "keep"))
        compared += 1
        agreed += expected is not None
    return compared, agreed


def test_version_is_read_as_mistral_common_reads_it(derived):
    for path in files(derived):
        tok, mt = pair(path)
        assert template_version(tok) == mt.instruct_tokenizer.tokenizer.version.value
    assert [pair(str(mistral_common_file(n)))[0].kind for n in (V3, TEKKEN)] == [
        "sentencepiece",
        "tekken",
    ]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_hand_written_conversations_equal_mistral_common(derived, tools):
    cases = [(c, tools) for c in PLAIN + TOOL_USE + REFUSED]
    for path in files(derived):
        _, accepted = compare(path, cases)
        v1_with_tools = tools and pair(path)[0].version == "v1"  # skipped
        assert v1_with_tools or accepted >= len(PLAIN) - 1  # accepted, not all refused alike


WORDS = ["Paris", "naïve", "😀 emoji", "漢字", "  ", "\n\n", "[INST]", "</s>", "x" * 30, "", "a b "]


def random_text(rng: random.Random) -> str:
    return "".join(
        rng.choice(WORDS) + rng.choice(["", " ", "\t"]) for _ in range(rng.randint(0, 4))
    )


def random_id(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choice(alphabet) for _ in range(9))


def random_conversation(rng: random.Random, with_tools: bool) -> list[dict]:
    """A conversation of the shapes people send: system prompts, turns, tool calls and their
    results (answered in any order), mostly valid and ending with a user turn or results."""
    messages = [system(random_text(rng))] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        messages.append(user(random_text(rng) or "?"))
        if rng.random() < 0.2:
            messages.append(system(random_text(rng)))  # a system message may follow a user
        if with_tools and rng.random() < 0.5:
            ids = [random_id(rng) for _ in range(rng.randint(1, 3))]
            arguments = [{"city": random_text(rng)}, '{"n": 1.5e3}', "", "{broken"]
            content = random_text(rng) if rng.random() < 0.5 else None
            calls = [call(i, rng.choice(["get_weather", "search-web_2"]), rng.choice(arguments))
                     for i in ids]  # fmt: skip
            messages.append(assistant(content, calls))
            results = [result(i, rng.choice(['{"temp": 3}', random_text(rng), "[]"])) for i in ids]
            rng.shuffle(results)
            messages += results
            if rng.random() < 0.3:
                break  # the prompt ends with the results
        if rng.random() < 0.8:
            messages.append(assistant(random_text(rng) or "ok"))
    if messages[-1]["role"] not in ("user", "tool"):
        messages.append(user(random_text(rng)))
    return messages


@pytest.mark.parametrize("seed", range(3))
def test_random_conversations_equal_mistral_common(derived, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(60):
        with_tools = rng.random() < 0.6
        tools = TOOLS if with_tools and rng.random() < 0.7 else None
        cases.append((random_conversation(rng, with_tools), tools))
    for path in files(derived):
        compared, accepted = compare(path, cases)
        assert accepted >= 0.7 * compared  # most are valid: the tokens are compared, not refusals


def test_v1_refuses_tools():
    """mistral-common's v1 drops the tools silently; we refuse them."""
    tok = pair(str(mistral_common_file(V1)))[0]
    with pytest.raises(MistralError, match="v1 has no tools"):
        encode_chat(tok, [user("hi")], tools=TOOLS)


def test_messages_and_dicts_and_the_system_argument_agree():
    tok = pair(str(mistral_common_file(V7)))[0]
    as_dicts = [system("S"), user("hi"), assistant("yo"), user("ok")]
    as_messages = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "ok")]
    assert encode_chat(tok, as_dicts) == encode_chat(tok, as_messages, system="S")


def test_a_forced_template_needs_its_control_tokens():
    tok = pair(str(mistral_common_file(V3)))[0]
    with pytest.raises(
        MistralError, match=r"template v7 needs the control token \[SYSTEM_PROMPT\]"
    ):
        encode_chat(tok, [user("hi")], system="S", version="v7")
    with pytest.raises(MistralError, match="not supported"):
        encode_chat(tok, [user("hi")], version="v5")


@pytest.mark.parametrize(
    "messages, why",
    [
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user"}], "no 'content'"),
        ([user([{"type": "image_url", "image_url": "x"}])], "only text content"),
        ([user(3)], "content must be text"),
        (
            [user("q"), assistant(calls=[{"id": "abc123XYZ"}]), result("abc123XYZ", "r")],
            "tool call",
        ),
        (["not a dict"], "not a dict"),
    ],
)
def test_malformed_messages_are_named(messages, why):
    tok = pair(str(mistral_common_file(V7)))[0]
    with pytest.raises(MistralError, match=why):
        encode_chat(tok, messages)
