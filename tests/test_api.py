"""The one way in: mistral.load with and without a path, the tokenizer it attaches, and the text
and streaming calls of Model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import mistral
from mistral.chat import Message, encode_chat
from mistral.checkpoint import DEFAULT_MODEL, write_checkpoint
from mistral.weights import random_weights
from tests.helpers import ROOT, V3, mistral_common_file, tiny

PROMPT = "And God said"


@pytest.fixture(scope="module")
def model() -> mistral.Model:
    return mistral.load()


def test_load_without_a_path_is_the_embedded_model_with_its_tokenizer(model):
    assert model.source == str(DEFAULT_MODEL)
    assert isinstance(model.tokenizer, mistral.Tokenizer)
    assert model.tokenizer.path == DEFAULT_MODEL / "tokenizer.model"
    assert model.args.vocab_size == model.tokenizer.vocab_size


def test_text_calls_equal_the_token_calls(model):
    tok = model.tokenizer
    ids = tok.encode(PROMPT)
    tokens = model.generate([ids], 40, eos_id=tok.eos_id)[0]
    expected = tok.decode([t for t in tokens if t != tok.eos_id])
    text = model.generate_text(PROMPT, max_tokens=40)
    assert text == tok.decode(ids + tokens)[len(tok.decode(ids)) :] and text.strip()
    assert text.strip() == expected.strip()
    pieces = list(model.stream_text(PROMPT, max_tokens=40))
    assert len(pieces) > 1 and "".join(pieces) == text


def test_stream_yields_each_step_as_generate_collects_them(model):
    rows = [model.tokenizer.encode(PROMPT), model.tokenizer.encode("In the beginning")]
    steps = list(model.stream(rows, 12))
    assert len(steps) == 12 and all(len(s) == 2 for s in steps)
    assert [[s[b] for s in steps] for b in range(2)] == model.generate(rows, 12)


def test_chat_messages_use_the_tokenizers_template(tmp_path):
    """OpenAI-style dicts, a system message included, give the prompt encode_chat builds."""
    tok = mistral.Tokenizer(mistral_common_file(V3))
    args = dataclasses.replace(tiny("tiny-dense"), vocab_size=tok.vocab_size)
    write_checkpoint(tmp_path, "mistral", args, random_weights(args, seed=1))
    shutil.copy(tok.path, tmp_path / "tokenizer.model.v3")
    model = mistral.load(tmp_path)
    assert model.tokenizer.path == tmp_path / "tokenizer.model.v3"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Who are you?"},
    ]
    turns = [Message("user", "Hello"), Message("assistant", "Hi."), Message("user", "Who are you?")]
    tokens = model.generate([encode_chat(tok, turns, "Be brief.")], 8, eos_id=tok.eos_id)[0]
    text = tok.decode([t for t in tokens if t != tok.eos_id])
    assert model.generate_text(messages, max_tokens=8).strip() == text.strip()
    with pytest.raises(mistral.MistralError, match="unknown role 'robot'"):
        model.generate_text([{"role": "robot", "content": "beep"}])


def test_a_folder_without_tokenizer_loads_but_refuses_text(tmp_path):
    shutil.copytree(DEFAULT_MODEL, tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer*"))
    model = mistral.load(tmp_path / "m")
    assert model.tokenizer is None
    assert len(model.generate([[1, 5, 6]], 3)[0]) == 3
    with pytest.raises(mistral.MistralError, match="no tokenizer"):
        model.generate_text(PROMPT)
    with_tok = mistral.load(tmp_path / "m", tokenizer=DEFAULT_MODEL / "tokenizer.model")
    assert with_tok.generate_text(PROMPT, max_tokens=5)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    with pytest.raises(mistral.MistralError, match="do not belong together"):
        mistral.load(DEFAULT_MODEL, tokenizer=mistral_common_file(V3))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_defaults_on_a_cpu_machine_and_float32_logits(backend):
    """README: None picks the best device (here the CPU: no GPU) and its dtype (float32 on CPUs);
    logits come back float32 whatever the run's dtype."""
    args = tiny("tiny-dense")
    weights = random_weights(args)
    default = mistral.from_tensors(args, weights, backend)
    assert (default.device, default.dtype) == ("cpu", "float32")
    half = mistral.from_tensors(args, weights, backend, device="cpu", dtype="bfloat16")
    [logits] = half.logits([[1, 2, 3]])
    assert logits.dtype == np.float32 and half.dtype == "bfloat16"


def test_the_readme_python_example_runs_as_written(capsys):
    """The API block of the README, run on the embedded model (the lines that need a folder,
    a GPU or the network are comments there)."""
    import re

    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert "." not in capsys.readouterr().out.splitlines()[0]  # stopped before the first "."
    assert len(scope["tokens"]) == 2 and scope["taps"]["logits"].shape[0] == len(scope["rows"][0])


def test_stop_texts_in_the_text_calls():
    import mistral

    model = mistral.load()
    whole = model.generate_text("And it came to pass", max_tokens=40)
    word = whole.split()[3]
    cut = model.generate_text("And it came to pass", max_tokens=40, stop=[word])
    assert cut == whole[: whole.index(word)]


LOAD_PEAK = """
import sys
import mistral
__import__(sys.argv[1])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
mistral.load(sys.argv[2], backend=sys.argv[1], device="cpu", dtype="bfloat16")
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="resets the peak as Linux's /proc does"
)
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_loading_a_folder_holds_one_copy_of_its_weights_at_its_peak(tmp_path, backend):
    """The file pages of each tensor, once copied, are given back (mistral.weights.release):
    before, every mapped page stayed resident beside its copy and the load peaked at twice the
    weights. small-bench in bfloat16, 109 MB: torch peaks at 1.36 times the weights (its own
    working memory the rest; 2.07 without the release), MLX at 1.37."""
    import subprocess
    import sys

    from mistral.args import from_params

    args = from_params(json.loads((ROOT / "mistral" / "configs" / "small-bench.json").read_text()))
    write_checkpoint(tmp_path, "mistral", args, random_weights(args), dtype="bfloat16")
    weights = (tmp_path / "consolidated.safetensors").stat().st_size
    run = [sys.executable, "-c", LOAD_PEAK, backend, str(tmp_path)]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    assert int(out.stdout) <= 1.5 * weights, (int(out.stdout) / weights, out.stderr[-500:])
