"""Checkpoint tensor names and shapes of the spec, and the check that a checkpoint matches them."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.measure import cpu_cores

# The dtypes a checkpoint may hold. numpy has no bfloat16: its bits travel as uint16. uint32 holds
# quantized codes (mistral/quant.py), never a weight by itself.
DTYPES = ("float32", "float16", "bfloat16")
# Kept in float32 whatever the run's dtype, as transformers keeps them: DeepSeek-V3's router bias,
# which picks the experts by differences smaller than bfloat16 resolves.
FLOAT32_KEYS = ("e_score_correction_bias",)
PACKED = "uint32"
EXPONENTS = "uint8"  # mxfp4's per-group scales, powers of two
FP8 = "float8_e4m3"  # codes of FP8 checkpoints (mistral/fp8.py), their bytes


@dataclass(frozen=True)
class RawTensor:
    """A tensor without a framework, in ``dtype`` (numpy has no bfloat16: its uint16 bits).

    ``data`` is always a numpy array of exactly ``shape``. Where the file stores the tensor as it
    is, that is ``source`` itself, memory-mapped and never read at load. Where a layout stores the
    rows in another order (Hugging Face's wq/wk), ``rows`` gives the order and ``data`` is gathered
    when asked for, so a folder is still read and converted one tensor at a time."""

    dtype: str
    source: np.ndarray
    rows: np.ndarray | None = None  # data = source[rows]

    def __post_init__(self) -> None:
        if self.dtype not in (*DTYPES, PACKED, EXPONENTS, FP8):
            raise MistralError(f"unsupported dtype {self.dtype}; use one of {', '.join(DTYPES)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def data(self) -> np.ndarray:
        return self.source if self.rows is None else self.source[self.rows]

    @property
    def nbytes(self) -> int:
        return int(self.source.nbytes)

    def reorder_rows(self, order: np.ndarray) -> RawTensor:
        """The tensor whose row r is this one's row order[r]; lazy, and a plain view again when
        two reorderings cancel out."""
        rows = order if self.rows is None else self.rows[order]
        if (rows == np.arange(len(rows))).all():
            return RawTensor(self.dtype, self.source)
        return RawTensor(self.dtype, self.source, rows)

    def to_numpy(self) -> np.ndarray:
        """A float32 copy (exact: every supported dtype widens losslessly)."""
        if self.dtype == "bfloat16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)


@dataclass(frozen=True)
class StackedTensor:
    """Tensors stacked along a new first axis, each the concatenation of its parts along their
    rows, made only when written (transformers' fused mistral4 experts: gate_up_proj)."""

    dtype: str
    parts: tuple[tuple[RawTensor, ...], ...]  # per stacked entry, its row blocks

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        return (len(self.parts), sum(p.shape[0] for p in first), *first[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    @property
    def data(self) -> np.ndarray:
        return np.stack([np.concatenate([p.data for p in blocks]) for blocks in self.parts])

    def to_numpy(self) -> np.ndarray:
        return RawTensor(self.dtype, self.data).to_numpy()


def from_numpy(a: np.ndarray, dtype: str | None = None) -> RawTensor:
    """Wraps a float array, cast to ``dtype`` (bfloat16 rounds to nearest even)."""
    dtype = dtype or str(a.dtype)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        return RawTensor("bfloat16", rounded.astype(np.uint16))
    if dtype not in DTYPES:
        raise MistralError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
    return RawTensor(dtype, np.ascontiguousarray(a, dtype=dtype))


def cast(t: RawTensor, dtype: str | None) -> RawTensor:
    """``t`` in ``dtype``; unchanged, bit for bit, when it already is (or dtype is None)."""
    if dtype is None or dtype == t.dtype:
        return t
    if t.dtype in (PACKED, EXPONENTS, FP8):
        raise MistralError("quantized codes cannot be cast: dequantize them first")
    return from_numpy(t.to_numpy(), dtype)


def cast_nbytes(t: RawTensor, dtype: str | None) -> int:
    """The size ``t`` will have once cast to ``dtype``."""
    return nbytes_of(t.shape, dtype or t.dtype)


def nbytes_of(shape: tuple[int, ...], dtype: str) -> int:
    """The bytes of a tensor of ``shape`` stored in ``dtype`` (any the files hold)."""
    itemsize = 4 if dtype in ("float32", PACKED) else 1 if dtype in (EXPONENTS, FP8) else 2
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the spec, named by its checkpoint key, in the order of the forward."""
    d, v = args.dim, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        attention = latent_attention_shapes(args) if args.mla else attention_shapes(args)
        shapes |= {p + "attention." + k: shape for k, shape in attention.items()}
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes |= {p + "feed_forward." + k: shape for k, shape in ffn_shapes(args, i).items()}
    shapes["norm.weight"] = (d,)
    if not args.tied_embeddings:  # tied: the output projection is tok_embeddings.weight
        shapes["output.weight"] = (v, d)
    return shapes


def attention_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    d, hd = args.dim, args.head_dim
    return {
        "wq.weight": (args.n_heads * hd, d),
        "wk.weight": (args.n_kv_heads * hd, d),
        "wv.weight": (args.n_kv_heads * hd, d),
        "wo.weight": (d, args.n_heads * hd),
    }


def latent_attention_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Latent attention under Mistral's names (transformers: q_proj or q_a_proj, q_a_layernorm
    and q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj)."""
    d, h, r, rope = args.dim, args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim
    qk = args.qk_nope_head_dim + rope  # type: ignore[operator]
    if args.q_lora_rank is None:
        shapes = {"wq.weight": (h * qk, d)}
    else:
        q = args.q_lora_rank
        shapes = {"wq_a.weight": (q, d), "q_a_norm.weight": (q,), "wq_b.weight": (h * qk, q)}
    return shapes | {
        "wkv_a_with_mqa.weight": (r + rope, d),  # type: ignore[operator]
        "kv_a_norm.weight": (r,),  # type: ignore[dict-item]
        "wkv_b.weight": (h * (args.qk_nope_head_dim + args.v_head_dim), r),  # type: ignore
        "wo.weight": (d, h * args.v_head_dim),  # type: ignore[operator]
    }


def ffn_shapes(args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
    """One layer's feed-forward: w1/w2/w3, or a gate over experts (and shared experts)."""
    d, m = args.dim, args.moe

    def ffn(prefix: str, h: int) -> dict[str, tuple[int, ...]]:
        return {
            prefix + "w1.weight": (h, d),
            prefix + "w2.weight": (d, h),
            prefix + "w3.weight": (h, d),
        }

    if m is None or not args.moe_layer(layer):
        return ffn("", args.hidden_dim)
    h = m.expert_hidden_dim or args.hidden_dim
    shapes = {"gate.weight": (m.num_experts, d)}
    if m.scoring_func == "sigmoid":  # DeepSeek-V3: a bias on the scores picks the experts
        shapes["gate.e_score_correction_bias"] = (m.num_experts,)
    for e in range(m.num_experts):
        shapes |= ffn(f"experts.{e}.", h)
    if m.num_shared_experts:
        shapes |= ffn("shared_experts.", h * m.num_shared_experts)
    return shapes


def tensor_count(args: ModelArgs) -> int:
    """How many tensors the spec has, without listing them (a config may claim 1e9 layers)."""
    attention = 4 if not args.mla else 5 if args.q_lora_rank is None else 7
    m = args.moe
    moe_ffn = 0 if m is None else 1 + (m.scoring_func == "sigmoid") + 3 * m.num_experts
    moe_ffn += 3 * bool(m and m.num_shared_experts)
    moe_layers = 0 if m is None else max(args.n_layers - m.first_k_dense_replace, 0)
    ffns = 3 * (args.n_layers - moe_layers) + moe_ffn * moe_layers
    return 3 - args.tied_embeddings + args.n_layers * (2 + attention) + ffns


def check_tensors(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raises one error listing missing, unexpected and wrongly shaped tensors."""
    if tensor_count(args) > len(shapes) + 10_000:  # too many to list: say so before listing
        raise MistralError(
            f"{source}: the config asks for {tensor_count(args):,} tensors, "
            f"the checkpoint holds {len(shapes):,}"
        )
    want = expected_shapes(args)
    problems = []
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    wrong = [
        f"{k} {tuple(shapes[k])} != {want[k]}"
        for k in want
        if k in shapes and tuple(shapes[k]) != want[k]
    ]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise MistralError(f"{source} does not match the model: " + "; ".join(problems))


def linear_bytes(args: ModelArgs, itemsize: int) -> int:
    """The bytes of every projection's weight (all but the embedding table and the norms): what
    decides whether a CPU reads them from its cache."""
    shapes = expected_shapes(args)
    products = sum(int(np.prod(shape)) for shape in shapes.values() if len(shape) == 2)
    if not args.tied_embeddings:  # a lookup, not a product (tied, it is the output's weight too)
        products -= int(np.prod(shapes["tok_embeddings.weight"]))
    return itemsize * products


def cache_bytes(args: ModelArgs, itemsize: int, batch: int, context: int) -> int:
    """What the caches of ``batch`` rows of up to ``context`` tokens hold: keys and values of
    every layer, a windowed layer keeping at most its window."""
    per_token = cached_numbers(args) * itemsize + 8  # and the planner's position
    slots = sum(context if w is None else min(w, context) for w in args.layer_windows())
    return batch * slots * per_token


def cached_numbers(args: ModelArgs) -> int:
    """Numbers one layer caches per token: keys and values, or latent attention's latent and
    its shared RoPE key."""
    if args.mla:
        return args.kv_lora_rank + args.qk_rope_head_dim  # type: ignore[operator]
    return 2 * args.n_kv_heads * args.head_dim


def random_weights(args: ModelArgs, seed: int = 0, dtype: str = "float32") -> dict[str, RawTensor]:
    """Seeded random weights of the spec's shapes (tests and benchmarks without a checkpoint).

    Each tensor is drawn from its own stream, seeded by (seed, its index), so the tensors can be
    drawn on every core at once (numpy lets go of the GIL) with the same values however many."""
    shapes = list(expected_shapes(args).items())

    def draw(i: int) -> RawTensor:
        name, shape = shapes[i]
        rng = np.random.default_rng([seed, i])
        if name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            a /= np.sqrt(shape[-1], dtype=np.float32)
        return from_numpy(a, dtype)

    with ThreadPoolExecutor(cpu_cores()) as pool:
        drawn = list(pool.map(draw, range(len(shapes))))
    return {name: t for (name, _), t in zip(shapes, drawn, strict=True)}


def release(*arrays: np.ndarray) -> None:
    """Tells the OS that the file pages under memory-mapped arrays, already copied, are not
    needed now (touched again, they are read from the file again): a loading backend then holds
    one copy of a folder's weights, not two. Without it the mapped pages of every tensor read so
    far stayed resident beside its copy, doubling the load's peak (1186 against 597 MiB for a
    590 MB bfloat16 folder on torch). Arrays not mapped from a file are left as they are."""
    for a in arrays:
        root = a  # the memmap over the whole mapping (its views keep the root's offset)
        while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
            root = root.base
        if not isinstance(root, np.memmap) or not hasattr(root.base, "madvise") or not a.nbytes:
            continue
        handle = root.base
        start = root.ctypes.data - root.offset % mmap.ALLOCATIONGRANULARITY  # the mapping's
        first = (a.ctypes.data - start) // mmap.PAGESIZE * mmap.PAGESIZE
        end = a.ctypes.data - start + a.nbytes
        if 0 <= first < end <= len(handle):
            with contextlib.suppress(OSError, ValueError):
                handle.madvise(mmap.MADV_DONTNEED, first, end - first)
