"""Run by mlx.launch in tests/test_parallel.py: one rank's logits and greedy tokens of a folder
split over the ranks (and tokens sampled without a seed, and bytes shared from rank 0), written
to OUT/mlx-rank<N>.npz."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mistral

folder, out, rows = sys.argv[1], Path(sys.argv[2]), [[1, 5, 9, 200, 17] * 9, [3, 4, 5]]
kind = sys.argv[3] if len(sys.argv) > 3 else "tensor"
model = mistral.load(folder, backend="mlx", device="cpu", dtype="float32", parallel=kind)
logits = model.logits(rows)
tokens = model.generate(rows, 24)
sampled = model.generate(rows, 12, temperature=1.0)  # no seed: rank 0's, shared
rank = mx.distributed.init().rank()
said = np.frombuffer(model.share(f"from rank {rank}".encode()) + model.share(b""), np.uint8)
arrays = {"a": logits[0], "b": logits[1], "tokens": np.array(tokens), "sampled": np.array(sampled)}
np.savez(out / f"mlx-rank{rank}.npz", **arrays, said=said)
