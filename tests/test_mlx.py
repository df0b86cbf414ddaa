"""The MLX backend: against the PyTorch backend on the same weights, and against mlx-lm's models."""

import gc

import numpy as np
import pytest

import mistral
import mistral.cache
from mistral import MistralError
from mistral.cache import CacheBook, StepPlan
from mistral.checkpoint import write_checkpoint
from mistral.contract import BACKENDS
from mistral.weights import random_weights
from tests.helpers import max_diff, mlx_lm_logits, mlx_lm_model, random_rows, tiny

CONFIGS = ["tiny-dense", "tiny-window", "tiny-moe"]
TOL = 1e-4


@pytest.fixture(scope="module", params=CONFIGS)
def trio(request):
    """(args, weights, torch model, mlx model) on the same seeded float32 weights."""
    args = tiny(request.param)
    weights = random_weights(args, seed=10 + CONFIGS.index(request.param))
    t = mistral.from_tensors(args, weights, backend="torch", device="cpu", dtype="float32")
    m = mistral.from_tensors(args, weights, backend="mlx", device="cpu", dtype="float32")
    return args, weights, t, m


def test_one_row_matches_torch(trio):
    args, _, t, m = trio
    rows = random_rows([13], args.vocab_size, 0)
    assert max_diff(m.logits(rows), t.logits(rows)) <= TOL


def test_ragged_batch_longer_than_the_window_matches_torch(trio):
    args, _, t, m = trio
    rows = random_rows([45, 2, 17, 33], args.vocab_size, 1)
    assert max_diff(m.logits(rows), t.logits(rows)) <= TOL


@pytest.mark.parametrize("chunk", [1, 6, 16])
def test_chunked_prefill_matches_torch(trio, chunk):
    args, _, t, m = trio
    rows = random_rows([50, 21], args.vocab_size, 2)
    assert max_diff(m.logits(rows, chunk_size=chunk), t.logits(rows)) <= TOL


def test_greedy_tokens_equal_torch_past_the_window(trio):
    args, _, t, m = trio
    prompts = random_rows([20, 7], args.vocab_size, 3)
    n = 32 + (args.sliding_window or 0)
    assert m.generate(prompts, n) == t.generate(prompts, n)


def test_cached_equals_uncached_and_chunked_equals_one_shot(trio):
    args, _, _, m = trio
    prompt = random_rows([9], args.vocab_size, 4)[0]
    new = m.generate([prompt], 30)[0]
    full = m.logits([prompt + new])[0]
    assert new == full[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert float(np.abs(m.logits([prompt + new], chunk_size=1)[0] - full).max()) <= 1e-5
    assert float(np.abs(m.logits([prompt + new], chunk_size=7)[0] - full).max()) <= 1e-5


def test_matches_mlx_lm_within_the_window(trio):
    """mlx-lm's llama/mixtral apply a sliding window only for layers listed in layer_types, and its
    llama needs at least one full-attention layer, so it cannot express an all-sliding Mistral: the
    comparison stays within the window (every length, for the config without one)."""
    args, weights, _, m = trio
    ref = mlx_lm_model(args, weights)
    longest = args.sliding_window or 48
    rows = random_rows([longest, 5, longest - 3], args.vocab_size, 5)
    assert max_diff(m.logits(rows), mlx_lm_logits(ref, rows)) <= TOL
    if args.sliding_window:  # past the window mlx-lm attends to everything; we must not
        row = random_rows([3 * args.sliding_window], args.vocab_size, 6)
        assert max_diff(m.logits(row), mlx_lm_logits(ref, row)) > 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_stays_close(trio, dtype):
    args, weights, _, m = trio
    half = mistral.from_tensors(args, weights, backend="mlx", device="cpu", dtype=dtype)
    assert half.dtype == dtype
    rows = random_rows([30, 11], args.vocab_size, 7)
    a, b = np.concatenate(m.logits(rows)), np.concatenate(half.logits(rows))
    assert np.isfinite(b).all()
    # Relative error of the logits is what half precision costs; argmax is checked on the trained
    # embedded model (random weights make near-ties). A position whose router chose other
    # experts is left out, if that choice was a near tie in float32 (its k-th and next best
    # gate logits within 0.05; tiny-moe in bfloat16 has one, 0.018 apart).
    err = np.abs(a - b).max(-1) / np.abs(a).max()  # per position
    tied = np.zeros(len(err), bool)
    traces = [[side.trace(r) for r in rows] for side in (m, half)] if args.moe else []
    for name in [f"layers.{i}" for i in range(args.n_layers) if traces and args.moe_layer(i)]:
        k = args.moe.num_experts_per_tok
        f32, low = (
            np.sort(np.concatenate([t[f"{name}.experts"] for t in ts]), -1) for ts in traces
        )
        other = (f32 != low).any(-1)  # positions whose experts differ
        gates = np.sort(np.concatenate([t[f"{name}.router_logits"] for t in traces[0]]), -1)
        assert (gates[other, -k] - gates[other, -k - 1]).max(initial=0) < 0.05
        tied |= other
    assert tied.mean() <= 0.05 and float(err[~tied].max()) < 0.1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_attention_on_the_cpu_is_as_close_as_torchs(dtype):
    """MLX 0.32's CPU attention computes in the inputs' dtype (its bfloat16 error twice torch's);
    ours computes half precision in float32 there: against float64, within 1.25x of the error
    of torch's own half-precision attention on the same inputs, GQA and a mask included."""
    import mlx.core as mx
    import torch

    from backends.mlx.model import scaled_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 200, 48)).astype(np.float32) * 2 for H in (4, 2, 2))
    mask = np.tril(np.ones((200, 200), bool))[None, None]
    wide = [torch.from_numpy(a).double() for a in (q, k, v)]
    truth = torch.nn.functional.scaled_dot_product_attention(
        *wide, attn_mask=torch.from_numpy(mask), enable_gqa=True
    ).numpy()
    half = [torch.from_numpy(a).to(getattr(torch, dtype)) for a in (q, k, v)]
    theirs = (
        torch.nn.functional.scaled_dot_product_attention(
            *half, attn_mask=torch.from_numpy(mask), enable_gqa=True
        )
        .float()
        .numpy()
    )
    with mx.stream(mx.cpu):
        ours = scaled_attention(*(mx.array(a).astype(getattr(mx, dtype)) for a in (q, k, v)),
                                mx.array(mask), 48**-0.5)  # fmt: skip
        assert ours.dtype == getattr(mx, dtype)
        ours = np.array(ours.astype(mx.float32))
    assert np.abs(ours - truth).mean() <= 1.25 * np.abs(theirs - truth).mean()


class ShuffledBook(CacheBook):
    """A planner that puts slot s where a fixed permutation says: a backend that obeys the plan
    computes the same logits; one that works out slots, positions or masks itself does not."""

    def step(self, seqlens) -> StepPlan:
        plan = super().step(seqlens)
        perm = np.roll(np.arange(self.size), 3)[::-1].copy()  # slot s -> perm[s]
        inverse = np.argsort(perm)
        key_pos, mask = plan.key_positions, plan.mask
        if plan.key_layout != "new":  # the first S key columns are slots: move column s to perm[s]
            S = self.size
            key_pos = np.concatenate([key_pos[:, :S][:, inverse], key_pos[:, S:]], axis=1)
            mask = np.concatenate([mask[..., :S][..., inverse], mask[..., S:]], axis=-1)
        return StepPlan(
            positions=plan.positions,
            valid=plan.valid,
            store_rows=plan.store_rows,
            store_cols=plan.store_cols,
            store_slots=perm[plan.store_slots],
            key_layout=plan.key_layout,
            mask=mask,
            key_positions=key_pos,
            lengths=plan.lengths,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_follow_the_shared_plan(monkeypatch, backend):
    args = tiny("tiny-window")
    model = mistral.from_tensors(args, random_weights(args, 3), backend=backend, device="cpu")
    rows = random_rows([40, 9], args.vocab_size, 8)
    expected = model.logits(rows, chunk_size=5)
    monkeypatch.setattr(mistral.cache, "CacheBook", ShuffledBook)
    assert max_diff(model.logits(rows, chunk_size=5), expected) <= 1e-5


def test_reads_safetensors_and_refuses_unknown_devices(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args, dtype="bfloat16"))
    m = mistral.load(tmp_path, backend="mlx", device="cpu", dtype="float32")
    assert m.backend == "mlx" and m.device == "cpu"
    with pytest.raises(MistralError, match="unknown MLX device"):
        mistral.load(tmp_path, backend="mlx", device="cuda")
    from backends.mlx.runner import gpu_available

    if gpu_available():
        assert mistral.load(tmp_path, backend="mlx", device="gpu").device == "gpu"
    else:
        with pytest.raises(MistralError, match="not available to MLX"):
            mistral.load(tmp_path, backend="mlx", device="gpu")


def test_moe_gathers_the_chosen_experts_without_a_host_sync_or_a_second_copy():
    """float32 on the CPU: experts stacked once for mx.gather_mm; same logits as the loop."""
    import mlx.core as mx

    args = tiny("tiny-moe")
    weights = random_weights(args, seed=21)
    # A first build makes what a process keeps once (which earlier tests in it may not have)
    mistral.from_tensors(args, weights, backend="mlx", device="cpu", dtype="float32")
    gc.collect()
    before = mx.get_active_memory()
    model = mistral.from_tensors(args, weights, backend="mlx", device="cpu", dtype="float32")
    held = mx.get_active_memory() - before
    assert held <= 1.05 * sum(t.nbytes for t in weights.values())  # not stacked and per expert
    moes = [block.feed_forward for block in model.runner.model.layers]
    assert all(moe.stacked is not None for moe in moes)
    rows = random_rows([30, 6], args.vocab_size, 9)
    gathered = model.logits(rows, chunk_size=7)
    for moe in moes:
        object.__setattr__(moe, "stacked", None)  # back to the per-expert loop
    assert max_diff(gathered, model.logits(rows, chunk_size=7)) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_experts_are_gathered_as_codes_too(tmp_path, dtype):
    """A 4-bit Mixtral folder (mlx-lm's switch_mlp): each layer's experts stacked as codes once
    for mx.gather_qmm, which runs on the CPU in bfloat16 too; same logits as the loop."""
    import mlx.core as mx

    from mistral.checkpoint import read_checkpoint, write_checkpoint
    from mistral.quant import Quantization

    args = tiny("tiny-moe")
    write_checkpoint(tmp_path, "mlx", args, random_weights(args, seed=21),
                     quantize=Quantization(4, 32))  # fmt: skip
    stored = sum(t.nbytes for t in read_checkpoint(tmp_path).tensors.values())
    # A first load makes what a process keeps once (which earlier tests in it may not have)
    mistral.load(tmp_path, backend="mlx", device="cpu", dtype=dtype)
    gc.collect()
    before = mx.get_active_memory()
    model = mistral.load(tmp_path, backend="mlx", device="cpu", dtype=dtype)
    # codes (scales and biases in the run's dtype), not stacked and per expert both
    assert mx.get_active_memory() - before <= 1.25 * stored
    moes = [block.feed_forward for block in model.runner.model.layers]
    assert all(moe.stacked is not None for moe in moes)
    rows = random_rows([30, 6], args.vocab_size, 9)
    gathered = model.logits(rows, chunk_size=7)
    for moe in moes:
        object.__setattr__(moe, "stacked", None)  # back to the per-expert loop
    assert max_diff(gathered, model.logits(rows, chunk_size=7)) <= 1e-5


def test_cpu_products_use_every_core_and_give_the_same_bits(monkeypatch):
    """On Linux MLX's CPU products run on one thread; once the weights outgrow the last-level
    cache the Linear layers cut them across one stream per core (SplitRows), which must not change
    a single bit of the result."""
    import platform

    import mlx.core as mx

    import backends.mlx.kernels as kernels
    from backends.mlx.kernels import SplitRows
    from backends.mlx.model import Linear
    from mistral.measure import cpu_cache_bytes, cpu_cores

    big = cpu_cache_bytes() + 1
    assert kernels.cpu_streams(mx.gpu, big) == []
    assert kernels.cpu_streams(mx.cpu, big - 1) == []  # read from the cache
    streams = kernels.cpu_streams(mx.cpu, big)
    splits = platform.system() != "Darwin" and cpu_cores() > 1
    assert len(streams) == (cpu_cores() if splits else 0)
    streams = streams or [mx.new_stream(mx.cpu) for _ in range(2)]
    for rows, x_shape, dtype in [
        (1537, (1, 1, 512), mx.float32),  # rows that do not divide evenly
        (96, (2, 37, 64), mx.float32),  # a prefill
        (96, (3, 64), mx.bfloat16),
        (1, (1, 1, 64), mx.float32),  # fewer rows than streams
    ]:
        w = mx.random.normal((rows, x_shape[-1]), key=mx.random.key(rows)).astype(dtype)
        x = mx.random.normal(x_shape, key=mx.random.key(7)).astype(dtype)
        mx.eval(w, x)
        kernel = SplitRows(w, streams)
        before = mx.get_active_memory()
        out = kernel(x, w)
        mx.eval(out, kernel.blocks)
        # The blocks are views of the weight: the output is new memory, a copy would be more.
        assert mx.get_active_memory() - before < out.nbytes + w.nbytes // 2
        assert out.shape == (*x_shape[:-1], rows)
        assert mx.array_equal(out, x @ w.T).item()
        assert mx.array_equal(kernel(x, 2 * w), x @ (2 * w).T).item()  # not its weight

    args = tiny("tiny-dense")
    weights = random_weights(args, seed=4)

    def linears(model):
        return [m for m in model.runner.model.modules() if isinstance(m, Linear)]

    small = linears(mistral.from_tensors(args, weights, backend="mlx", device="cpu"))
    assert len(small) == 7 * args.n_layers + 1 and all(m.kernel is None for m in small)
    monkeypatch.setattr(kernels, "cpu_cache_bytes", lambda: 0)  # as if the weights outgrew it
    model = mistral.from_tensors(args, weights, backend="mlx", device="cpu")
    split = linears(model)
    if splits:
        assert all(isinstance(m.kernel, SplitRows) and m.kernel.weight is m.weight for m in split)
    rows = random_rows([20, 5], args.vocab_size, 2)
    expected = model.logits(rows)
    for m in split:
        m.kernel = None
    for a, b in zip(expected, model.logits(rows), strict=True):
        assert np.array_equal(a, b)
