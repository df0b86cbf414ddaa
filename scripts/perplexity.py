"""Perplexity of model folders on the embedded model's held-out text (the end of Revelation,
never trained on), as scripts/train_default_model.py measures its held-out loss: non-overlapping
windows of 256 tokens. On demand (needs Debian's bible-kjv for the text):

    .venv/bin/python scripts/perplexity.py FOLDER [FOLDER ...] [--backend mlx] [--dtype bfloat16]

e.g. the embedded model against its quantized conversions (mistral convert --to mlx --quantize).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_default_model import CONTEXT, bible_chapters

import mistral

HELD_OUT = 20_000  # tokens at the end of the text, as the training script holds them out


def held_out_ids(tok: mistral.Tokenizer) -> np.ndarray:
    ids = np.concatenate([np.array(tok.encode(c), dtype=np.int64) for c in bible_chapters()])
    return ids[-HELD_OUT:]


def perplexity(model: mistral.Model, ids: np.ndarray) -> float:
    n = (len(ids) - 1) // CONTEXT
    x = ids[: n * CONTEXT].reshape(n, CONTEXT)
    y = ids[1 : n * CONTEXT + 1].reshape(n, CONTEXT)
    total = 0.0
    for logits, target in zip(model.logits(x.tolist()), y, strict=True):
        z = logits.astype(np.float64)
        lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
        total += float((lse - z[np.arange(len(target)), target]).sum())
    return math.exp(total / (n * CONTEXT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", default="float32")
    opt = p.parse_args()
    ids = None
    for folder in opt.folders:
        model = mistral.load(folder, backend=opt.backend, device="cpu", dtype=opt.dtype)
        ids = held_out_ids(model.tokenizer) if ids is None else ids
        print(f"{folder}: perplexity {perplexity(model, ids):.3f} ({opt.backend}, {opt.dtype})")


if __name__ == "__main__":
    main()
