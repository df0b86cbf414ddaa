"""`mistral generate` as users of mlx-lm and transformers expect it: stop texts, JSON with
log-probabilities, quiet output, prompts from a file, sampling options, early refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mistral
from tests.test_cli import run


def greedy(*extra: str) -> str:
    out = run("generate", "--prompt", "And it came to pass", "--max-tokens", "40", *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_stop_text_ends_the_generation_and_is_not_printed():
    whole = greedy("--quiet")
    stop = whole.split()[4]  # a word from the middle of the greedy continuation
    cut = greedy("--quiet", "--stop", stop, "--stop", "never-appears")
    assert stop not in cut
    assert cut.rstrip("\n") == whole[: whole.index(stop)]


def test_json_gives_the_tokens_and_why_it_stopped(tmp_path):
    out = run(
        "generate", "--prompt", "In the beginning", "--prompt", "Jesus wept.", "--json",
        "--max-tokens", "12",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    objects = [json.loads(line) for line in out.stdout.splitlines()]
    assert [o["prompt"] for o in objects] == ["In the beginning", "Jesus wept."]
    model = mistral.load()
    tok = model.tokenizer
    for o in objects:
        assert o["prompt_tokens"] == tok.encode(o["prompt"])
        expected = model.generate([o["prompt_tokens"]], 12, eos_id=tok.eos_id)[0]
        if o["finish_reason"] == "eos":
            assert expected[-1] == tok.eos_id and o["tokens"] == expected[:-1]
        else:
            assert o["finish_reason"] == "length" and o["tokens"] == expected
        assert o["text"] == tok.decode(o["prompt_tokens"] + o["tokens"])[len(o["prompt"]) :]
    stopped = run("generate", "--prompt", "In the beginning", "--json", "--stop", " the")
    assert json.loads(stopped.stdout)["finish_reason"] == "stop"


def test_logprobs_are_a_log_softmax_of_the_logits():
    out = run(
        "generate", "--prompt", "And God said", "--json", "--logprobs", "3", "--max-tokens", "6",
        "--temperature", "0.9", "--seed", "4",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    o = json.loads(out.stdout)
    model = mistral.load()
    [logits] = model.logits([o["prompt_tokens"] + o["tokens"]])
    n = len(o["prompt_tokens"])
    for i, entry in enumerate(o["logprobs"]):
        z = logits[n - 1 + i].astype(np.float64)
        lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        assert entry["token"] == o["tokens"][i]
        assert entry["logprob"] == pytest.approx(lp[entry["token"]], abs=1e-4)
        assert [a["token"] for a in entry["top"]] == np.argsort(-lp)[:3].tolist()
        assert [a["logprob"] for a in entry["top"]] == pytest.approx(
            np.sort(lp)[::-1][:3], abs=1e-4
        )


def test_quiet_prints_the_text_alone_and_the_stats_name_peak_memory():
    quiet = run("generate", "--prompt", "And", "--max-tokens", "8", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and not quiet.stdout.startswith("And")
    loud = run("generate", "--prompt", "And", "--max-tokens", "8")
    assert loud.stdout.startswith("And") and loud.stdout.endswith(quiet.stdout)
    assert "peak memory:" in loud.stderr and "MiB (resident)" in loud.stderr


def test_prompts_from_a_file_are_each_streamed_and_labelled(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("In the beginning\n\nJesus wept.\n", encoding="utf-8")
    out = run("generate", "--prompts-file", str(f), "--max-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[1/2] In the beginning") and "\n\n[2/2] Jesus wept." in out.stdout
    (tmp_path / "empty.txt").write_text("\n \n")
    bad = run("generate", "--prompts-file", str(tmp_path / "empty.txt"))
    assert bad.returncode == 1 and "no prompts" in bad.stderr


def test_top_k_one_is_greedy_whatever_the_temperature():
    sampled = run("generate", "--prompt", "And", "--max-tokens", "12", "--quiet",
                  "--temperature", "3", "--top-k", "1", "--seed", "1")  # fmt: skip
    assert (
        sampled.stdout == run("generate", "--prompt", "And", "--max-tokens", "12", "--quiet").stdout
    )
    minp = run("generate", "--prompt", "And", "--max-tokens", "12", "--quiet",
               "--temperature", "3", "--min-p", "0.99", "--seed", "1")  # fmt: skip
    assert minp.stdout == sampled.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be"),
        (["--min-p", "1"], "min_p must be in [0, 1)"),
        (["--seed", "-1"], "seed must be"),
        (["--logprobs", "3"], "--logprobs needs --json"),
        (["--stop", ""], "stop texts must be non-empty"),
    ],
)
def test_bad_options_are_refused_before_anything_is_printed(argv, message):
    out = run("generate", "--prompt", "And", *argv)
    assert out.returncode == 1 and out.stdout == ""
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_stop_split_across_pieces_is_held_back_then_cut():
    from mistral.stops import StopText

    s = StopText(["\n\n", "END"])
    assert s.push("Hello\n") == "Hello"  # "\n" may begin a stop
    assert s.push("world E") == "\nworld "  # it did not; "E" may begin "END"
    assert s.push("NDING") == "" and s.stopped
    assert s.push("more") == "" and s.flush() == ""
    t = StopText(["abc"])
    assert t.push("xab") == "x" and t.flush() == "ab"  # ended without the stop: shown
