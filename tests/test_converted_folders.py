"""Converted folders work in the other tools as they are: transformers' AutoTokenizer and
AutoModelForCausalLM, mlx-lm's load and generate, on what `mistral convert` writes."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

import mistral
from mistral.hf_tokenizer import tokenizer_files
from mistral.tokenizer import Tokenizer
from tests.helpers import ROOT, mistral_common_file

DEFAULT = ROOT / "mistral" / "default_model"
TEXTS = [
    "And it came to pass",
    " leading space",
    "two  spaces",
    "tab\tand\nnewline",
    "ünïcödé ✓ 中文 🙂",
    "[INST] hi [/INST] </s><s>",  # control text stays text
    "",
    "end.   ",
    "\n\nx",
    "def f(x):\n    return x**2  # ok",
    "🙂🙂 😀 ça va? Très bien!",
]
RANDOM = random.Random(0)
TEXTS += [
    "".join(RANDOM.choice("abc xyz\n\t  éü中🙂.,[]<>/") for _ in range(RANDOM.randint(1, 40)))
    for _ in range(150)
]
FILES = [
    DEFAULT / "tokenizer.model",
    mistral_common_file("tokenizer.model.v1"),
    mistral_common_file("mistral_instruct_tokenizer_240323.model.v3"),
    mistral_common_file("mistral_instruct_tokenizer_241114.model.v7"),
    mistral_common_file("tekken_240718.json"),
    mistral_common_file("tekken_240911.json"),
]


def convert(src, dst, to: str) -> None:
    run = [sys.executable, "-m", "mistral", "convert", str(src), str(dst), "--to", to]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_auto_tokenizer_encodes_and_decodes_as_we_do(tmp_path, path):
    from transformers import AutoTokenizer

    ours = Tokenizer(path)
    for name, body in tokenizer_files(ours).items():
        (tmp_path / name).write_text(json.dumps(body, ensure_ascii=False))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text).input_ids == ids, text  # BOS first, as ours
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), text


def test_mlx_lm_runs_our_mlx_folder_and_chooses_our_tokens(tmp_path):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    convert(DEFAULT, tmp_path / "m", "mlx")
    assert not (tmp_path / "m" / "params.json").exists()
    model, tokenizer = load(str(tmp_path / "m"))
    ours = mistral.load(tmp_path / "m", backend="mlx", device="cpu")
    prompt = ours.tokenizer.encode("And it came to pass that")
    assert tokenizer.encode("And it came to pass that") == prompt  # BOS included
    theirs = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=40)]
    assert theirs == ours.generate([prompt], 40)[0]


def test_transformers_runs_our_hf_folder_and_chooses_our_tokens(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert(DEFAULT, tmp_path / "h", "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "h")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h", dtype=torch.float32)
    ours = mistral.load(tmp_path / "h", device="cpu")
    ids = tok("In the beginning").input_ids
    assert ids == ours.tokenizer.encode("In the beginning")
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out[0, len(ids) :].tolist() == ours.generate([ids], 40)[0]


def test_the_older_mlx_examples_layout_is_still_written_and_read(tmp_path):
    convert(DEFAULT, tmp_path / "x", "mlx-examples")
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert names == ["params.json", "tokenizer.model", "weights.safetensors"]  # bfloat16
    back = mistral.load(tmp_path / "x", device="cpu")
    assert back.generate([[1, 300]], 8) == mistral.load(device="cpu").generate([[1, 300]], 8)
