"""Trains the embedded default model: a small Mistral on the King James Bible, and its tokenizer.

The text comes from Debian's bible-kjv package (``apt-get install bible-kjv``), printed whole by
``bible -f gen1:1-rev22:21``. The model is the project's own PyTorch Transformer, trained with a
plain causal objective, run without a cache through the same planner's masks as inference (one
"new"-layout step per batch), so what is trained is exactly what runs.

    python scripts/train_default_model.py --minutes 20 --out mistral/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from backends.torch.cache import Step
from backends.torch.model import Transformer
from mistral.args import ModelArgs
from mistral.cache import plan_prefill
from mistral.checkpoint import write_checkpoint
from mistral.rope import Rope
from mistral.weights import from_numpy

ARGS = ModelArgs(
    dim=192,
    n_layers=4,
    head_dim=48,
    hidden_dim=576,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=2048,
    rope_theta=10000.0,
    sliding_window=128,  # shorter than the 256-token training context, so the window matters
)
ROPE = Rope.of(ARGS)
CONTEXT = 256


def bible_chapters() -> list[str]:
    """One string per chapter, verse references stripped."""
    out = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+?\d*?)(\d+):\d+ (.*)$", line)
        if m:
            chapters.setdefault(m.group(1) + m.group(2), []).append(m.group(3).strip())
        elif chapters and line.strip():  # a verse continued on the next line
            next(reversed(chapters.values()))[-1] += " " + line.strip()
    return [" ".join(verses) for verses in chapters.values()]


def train_tokenizer(chapters: list[str], out: Path) -> spm.SentencePieceProcessor:
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "kjv.txt"
        # One verse-ish sentence per line keeps sentencepiece's sentence length limit happy.
        text.write_text("\n".join(s for c in chapters for s in re.split(r"(?<=[.;:?!]) ", c)))
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(Path(tmp) / "tokenizer"),
            model_type="bpe",
            vocab_size=ARGS.vocab_size,
            character_coverage=1.0,
            byte_fallback=True,  # as Mistral's tokenizers: no unknown text, ever
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            split_digits=True,
            num_threads=2,
            minloglevel=2,
        )
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))


def forward(model: Transformer, tokens: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """An uncached forward through the shared planner's mask: (B, T) -> (B, T, V) logits."""
    B, T = tokens.shape
    plans = plan_prefill([T] * B, ARGS.layer_windows())
    return model(tokens, {w: Step.from_plan(plan, ROPE, inv_freq) for w, plan in plans.items()})


def init_weights(model: Transformer) -> None:
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.fill_(1.0)
            else:
                w.normal_(0.0, 0.02 if "wo" not in name and "w2" not in name else 0.02 / 3)


def train(model: Transformer, ids: np.ndarray, opt: argparse.Namespace) -> int:
    """Trains for opt.minutes (warm-up, then a cosine decay to a tenth); returns the steps."""
    inv_freq = torch.from_numpy(ROPE.inv_freq)
    optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(opt.seed)
    budget = opt.minutes * 60
    start = time.time()
    step = 0
    while (elapsed := time.time() - start) < budget:
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        lr = opt.lr * min(1.0, (step + 1) / 100) * decay
        for group in optim.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(ids) - CONTEXT - 1, opt.batch)
        batch = torch.from_numpy(np.stack([ids[s : s + CONTEXT + 1] for s in starts]))
        logits = forward(model, batch[:, :-1], inv_freq)
        loss = F.cross_entropy(logits.reshape(-1, ARGS.vocab_size), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 50 == 0:
            minutes = elapsed / 60
            print(f"step {step:5d}  {minutes:5.1f} min  lr {lr:.2e}  loss {loss.item():.3f}")
        step += 1
    return step


def held_out_loss(model: Transformer, held_out: np.ndarray) -> float:
    inv_freq = torch.from_numpy(ROPE.inv_freq)
    model.eval()
    with torch.no_grad():
        n = (len(held_out) - 1) // CONTEXT
        chunks = torch.from_numpy(held_out[: n * CONTEXT + 1])
        x = chunks[:-1].view(n, CONTEXT)
        y = chunks[1:].view(n, CONTEXT)
        logits = forward(model, x, inv_freq)
        return F.cross_entropy(logits.reshape(-1, ARGS.vocab_size), y.reshape(-1)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mistral/default_model"))
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args()
    torch.manual_seed(opt.seed)
    torch.set_num_threads(2)
    opt.out.mkdir(parents=True, exist_ok=True)

    chapters = bible_chapters()
    sp = train_tokenizer(chapters, opt.out)
    ids = np.concatenate([np.array([1, *sp.encode(c)], dtype=np.int64) for c in chapters])
    print(f"{len(chapters)} chapters, {len(ids):,} tokens")
    held_out = ids[-20_000:]  # the end of Revelation, never trained on
    ids = ids[:-20_000]

    model = Transformer(ARGS)
    init_weights(model)
    steps = train(model, ids, opt)
    val = held_out_loss(model, held_out)
    print(f"held-out loss {val:.3f} after {steps} steps")
    tensors = {k: from_numpy(v.detach().numpy(), "bfloat16") for k, v in model.state_dict().items()}
    write_checkpoint(opt.out, "mistral", ARGS, tensors)
    record = {
        "text": "King James Bible, Debian bible-kjv (bible -f gen1:1-rev22:21)",
        "tokens": len(ids),
        "steps": steps,
        "batch": opt.batch,
        "context": CONTEXT,
        "minutes": opt.minutes,
        "held_out_loss": round(val, 4),
        "seed": opt.seed,
    }
    (opt.out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
