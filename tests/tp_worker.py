"""Run by torchrun in tests/test_parallel.py: one rank's logits and greedy tokens of a folder
split over the ranks, written to OUT/rank<N>.npz."""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

import mistral

folder, out, rows = sys.argv[1], Path(sys.argv[2]), [[1, 5, 9, 200, 17] * 9, [3, 4, 5]]
model = mistral.load(folder, backend="torch", device="cpu", dtype="float32", parallel="tensor")
logits = model.logits(rows)
tokens = model.generate(rows, 24)
np.savez(out / f"rank{dist.get_rank()}.npz", a=logits[0], b=logits[1], tokens=np.array(tokens))
