"""Plants one plausible bug at a time in the modules where a bug is silent (the planner, RoPE,
the q/k un-permutation, sampling, diff's verdict, the generation loop, YaRN, query scaling,
per-layer windows) and runs the tests that should catch it: a mutant the tests pass is a
survivor. On demand, not in CI (minutes):

    .venv/bin/python scripts/mutants.py [--only NAME]

Each mutant is an exact replacement in one file; the file is restored afterwards, whatever
happens. Prints one line per mutant and exits 1 if any survived.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["tests/test_cache.py", "tests/test_architecture.py", "tests/test_sampling.py"]
PARITY = ["tests/test_torch.py", "tests/test_mlx.py", "tests/test_diff.py", "tests/test_formats.py"]

# (name, file, text, replacement, tests)
MUTANTS = [
    (
        "window off by one",
        "mistral/cache.py",
        "mask &= q - k < window",
        "mask &= q - k <= window",
        FAST + PARITY,
    ),
    (
        "empty slots visible",
        "mistral/cache.py",
        "mask = (k >= 0) & (k <= q)",
        "mask = k <= q",
        FAST + PARITY,
    ),
    (
        "future visible",
        "mistral/cache.py",
        "mask = (k >= 0) & (k <= q)",
        "mask = k >= 0",
        FAST + PARITY,
    ),
    (
        "one token too few stored",
        "mistral/cache.py",
        "valid & (t[None, :] >= seqlens[:, None] - S)",
        "valid & (t[None, :] > seqlens[:, None] - S)",
        FAST + PARITY,
    ),
    (
        "write before reading evicted keys",
        "mistral/cache.py",
        "if ((evicted >= 0) & (first_q - evicted < self.window)).any():",
        "if ((evicted >= 0) & (first_q - evicted < self.window - 1)).any():",
        FAST + PARITY,
    ),
    (
        "rope frequencies shifted",
        "mistral/rope.py",
        "np.arange(0, head_dim, 2, dtype=np.float64)",
        "np.arange(1, head_dim + 1, 2, dtype=np.float64)",
        PARITY,
    ),
    (
        "q/k not un-permuted",
        "mistral/hf.py",
        "order = np.arange(rows).reshape(n_heads, 2, d // 2).transpose(0, 2, 1)",
        "order = np.arange(rows).reshape(n_heads, 2, d // 2)",
        PARITY,
    ),
    (
        "nucleus cut with <=",
        "mistral/sampling.py",
        "before < top_p",
        "before <= top_p",
        ["tests/test_sampling.py"],
    ),
    (
        "top-p ignored",
        "mistral/sampling.py",
        "before < top_p",
        "before < 2",
        ["tests/test_sampling.py"],
    ),
    (
        "temperature ignored",
        "mistral/sampling.py",
        "probs = np.exp((z - z.max(-1, keepdims=True)) / temperature)",
        "probs = np.exp(z - z.max(-1, keepdims=True))",
        ["tests/test_sampling.py"],
    ),
    (
        "diff never disagrees",
        "mistral/diff.py",
        "return self.first_divergence is None",
        "return True",
        ["tests/test_diff.py", "tests/test_cli.py"],
    ),
    (
        "diff tolerance 10x loose",
        "mistral/diff.py",
        "return self.rel > self.tolerance",
        "return self.rel > 10 * self.tolerance",
        ["tests/test_diff.py", "tests/test_cli.py"],
    ),
    (
        "diff uses the finer dtype",
        "mistral/diff.py",
        "coarser = max(dtype_a, dtype_b, key=COARSENESS.index)",
        "coarser = min(dtype_a, dtype_b, key=COARSENESS.index)",
        ["tests/test_diff.py", "tests/test_cli.py"],
    ),
    (
        "eos ignored",
        "mistral/generate.py",
        "done |= tokens == eos_id",
        "done |= False",
        ["tests/test_torch.py", "tests/test_chat.py", "tests/test_api.py"],
    ),
    (
        "routing softmax in the half dtype",  # torch's own bf16 softmax is float32 inside
        "backends/torch/model.py",
        "    logits = logits.float()\n    scores = logits.softmax(-1)",
        "    e = (logits - logits.amax(-1, keepdim=True)).exp()\n"
        "    scores = e / e.sum(-1, keepdim=True)",
        ["tests/test_embedded.py"],
    ),
    (
        "yarn ramp reversed",
        "mistral/rope.py",
        "keep = 1.0 - ramp",
        "keep = ramp",
        ["tests/test_families.py"],
    ),
    (
        "yarn magnitude ignored",
        "mistral/rope.py",
        "mscale = yarn_mscale(y.factor) if y.apply_scale else 1.0",
        "mscale = 1.0",
        ["tests/test_families.py"],
    ),
    (
        "query scaling by the next period",
        "mistral/rope.py",
        "periods = np.floor(positions / scaling.original_max_position_embeddings)",
        "periods = np.ceil(positions / scaling.original_max_position_embeddings)",
        ["tests/test_families.py"],
    ),
    (
        "window pattern not repeated",
        "mistral/args.py",
        "return w * (self.n_layers // len(w))",
        "return [w[0]] * self.n_layers",
        ["tests/test_families.py"],
    ),
    (
        "latent softmax scale without its square",
        "mistral/rope.py",
        "return head_dim**-0.5 * extra**2",
        "return head_dim**-0.5 * extra",
        ["tests/test_latent.py"],
    ),
    (
        "groups scored the other way",
        "backends/mlx/model.py",
        '1 if moe.group_scoring == "max" else 2',
        '2 if moe.group_scoring == "max" else 1',
        ["tests/test_latent.py"],
    ),
    (
        "router bias ignored",
        "backends/torch/model.py",
        "choice = scores if bias is None else scores + bias.float()",
        "choice = scores",
        ["tests/test_latent.py"],
    ),
    (
        "absorbed queries off by 0.1%",
        "backends/torch/model.py",
        "queries = torch.cat([q_nope @ w_k, q_rope], dim=-1)",
        "queries = torch.cat([q_nope @ w_k * 1.001, q_rope], dim=-1)",
        ["tests/test_latent.py"],
    ),
    (
        "the dense first layers routed",
        "mistral/args.py",
        "return self.moe is not None and layer >= self.moe.first_k_dense_replace",
        "return self.moe is not None",
        ["tests/test_latent.py"],
    ),
]


def run(name: str, file: str, text: str, replacement: str, tests: list[str]) -> bool:
    """True if the tests caught the mutant."""
    path = ROOT / file
    original = path.read_text()
    if original.count(text) != 1:
        raise SystemExit(f"{name}: {text!r} is not found once in {file}: update the mutant")
    path.write_text(original.replace(text, replacement))
    try:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False).returncode != 0
    finally:
        path.write_text(original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants whose name contains this")
    opt = parser.parse_args()
    survivors = []
    for name, *rest in MUTANTS:
        if opt.only and opt.only not in name:
            continue
        start = time.perf_counter()
        caught = run(name, *rest)
        took = time.perf_counter() - start
        print(f"{'caught  ' if caught else 'SURVIVED'}  {name}  ({took:.0f} s)", flush=True)
        if not caught:
            survivors.append(name)
    print(f"{len(survivors)} survivor(s)" + (f": {', '.join(survivors)}" if survivors else ""))
    raise SystemExit(1 if survivors else 0)


if __name__ == "__main__":
    main()
