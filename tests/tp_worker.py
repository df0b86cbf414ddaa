"""Run by torchrun in tests/test_parallel.py: one rank's logits and greedy tokens of each folder
given, split over the ranks (and tokens sampled without a seed, and bytes shared from
rank 0) (tensor or pipeline), written to OUT/rank<N>-<I>.npz, with what the
rank holds."""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

import mistral

kind, out, folders = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
rows = [[1, 5, 9, 200, 17] * 9, [3, 4, 5]]
for i, folder in enumerate(folders):  # one process group serves every model in turn
    model = mistral.load(folder, backend="torch", device="cpu", dtype="float32", parallel=kind)
    logits = model.logits(rows)
    tokens = model.generate(rows, 24)
    sampled = model.generate(rows, 12, temperature=1.0)  # no seed: rank 0's, shared
    said = model.share(f"from rank {dist.get_rank()}".encode()) + model.share(b"")
    held = sum(p.numel() for p in model.runner.model.parameters())  # what this rank holds
    np.savez(
        out / f"rank{dist.get_rank()}-{i}.npz",
        a=logits[0],
        b=logits[1],
        tokens=np.array(tokens),
        sampled=np.array(sampled),
        said=np.frombuffer(said, np.uint8),
        held=held,
    )
