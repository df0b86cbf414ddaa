"""Opt-in checks on a CUDA or Metal device: `pytest -m gpu`. Not part of the default suite."""

import numpy as np
import pytest

import mistral
from mistral.tokenizer import Tokenizer
from mistral.weights import random_weights
from tests.helpers import ROOT, max_diff, random_rows, tiny
from tests.test_embedded import PROMPTS

pytestmark = pytest.mark.gpu
DEFAULT = ROOT / "mistral" / "default_model"


def cuda_or_skip() -> None:
    """Fails (not skips) where -m gpu was asked for without CUDA: a GPU run that checked
    nothing must not look green."""
    try:
        import torch
    except ImportError:
        pytest.fail("-m gpu was asked for, but torch is not installed")
    if not torch.cuda.is_available():
        pytest.fail("-m gpu was asked for, but torch sees no CUDA device")


@pytest.mark.parametrize("config", ["tiny-window", "tiny-moe", "tiny-latent"])
def test_cuda_float32_matches_cpu(config):
    cuda_or_skip()
    args = tiny(config)
    weights = random_weights(args, seed=1)
    rows = random_rows([45, 7, 20], args.vocab_size, 0)
    cpu = mistral.from_tensors(args, weights, device="cpu", dtype="float32")
    gpu = mistral.from_tensors(args, weights, device="cuda", dtype="float32")
    # TF32 matmuls are off by default in torch for float32; the tolerance stays at 1e-4.
    assert max_diff(gpu.logits(rows, chunk_size=6), cpu.logits(rows)) <= 1e-4
    assert gpu.generate(rows, 40) == cpu.generate(rows, 40)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_keeps_the_argmax(dtype):
    """Over the ~1600 positions the CPU test uses (a few hundred are too few: near-ties)."""
    cuda_or_skip()
    tok = Tokenizer(DEFAULT / "tokenizer.model")
    full = mistral.load(DEFAULT, device="cuda", dtype="float32")
    half = mistral.load(DEFAULT, device="cuda", dtype=dtype)
    prompts = [tok.encode(p) for p in PROMPTS]
    rows = [p + g for p, g in zip(prompts, full.generate(prompts, 300), strict=True)]
    a = np.concatenate(full.logits(rows)).argmax(-1)
    b = np.concatenate(half.logits(rows)).argmax(-1)
    assert (a == b).mean() >= 0.99


def test_cuda_graph_decode_equals_eager():
    cuda_or_skip()
    args = tiny("tiny-window")
    weights = random_weights(args, seed=2)
    eager = mistral.from_tensors(args, weights, device="cuda", dtype="bfloat16")
    graphed = mistral.from_tensors(args, weights, device="cuda", dtype="bfloat16", compile=True)
    rows = random_rows([12, 12], args.vocab_size, 1)
    out = graphed.generate(rows, 48)
    assert out == eager.generate(rows, 48)
    full = [r + t for r, t in zip(rows, out, strict=True)]
    assert max_diff(graphed.logits(full, chunk_size=1), eager.logits(full, chunk_size=1)) <= 2e-2


def test_mlx_gpu_matches_mlx_cpu():
    """Applies where MLX has a GPU (Metal, or mlx[cuda]); a CUDA box with mlx[cpu] has none."""
    mx = pytest.importorskip("mlx.core")
    if not mx.is_available(mx.gpu):
        pytest.skip("MLX has no GPU here (mlx[cpu]): nothing of MLX's to check on this device")
    args = tiny("tiny-moe")
    weights = random_weights(args, seed=3)
    rows = random_rows([40, 9], args.vocab_size, 2)
    cpu = mistral.from_tensors(args, weights, backend="mlx", device="cpu", dtype="float32")
    gpu = mistral.from_tensors(args, weights, backend="mlx", device="gpu", dtype="float32")
    assert max_diff(gpu.logits(rows), cpu.logits(rows)) <= 1e-4


def test_cuda_bench_with_compile_reports_sane_numbers():
    """`mistral bench --compile` on CUDA: the graphed decode runs, memory is device memory added
    by each implementation, and the bound uses the device's own copy bandwidth."""
    cuda_or_skip()
    from mistral.bench import BenchSetup, run_bench

    args = tiny("tiny-moe")
    weights = random_weights(args, seed=4, dtype="bfloat16")
    setup = BenchSetup(
        args, weights, "tiny-moe", "torch", "cuda", "bfloat16", 32, 16, 2, 2, 1, None, ("hf",), True
    )
    report = run_bench(setup)
    for r in report["results"]:
        assert r["device"].startswith("cuda")
        assert r["decode_tok_s"]["median"] > 0 and r["peak_bytes"]["median"] > 0
    assert report["bandwidth_bytes_s"] > 1e11  # any datacenter GPU copies faster than 100 GB/s
    assert report["matmul_flop_s"] > 1e13  # and multiplies bfloat16 faster than 10 TFLOP/s
    assert 0 < report["prefill_fraction_of_matmul"] < 1


@pytest.mark.parametrize("bits", [4, 3])
def test_cuda_keeps_quantized_codes_and_matches_cpu(tmp_path, bits):
    """The torch backend's layers unpack and dequantize mlx-lm's codes on the device (from the
    words' bytes, 3 bits across them): the same bits as on the CPU."""
    cuda_or_skip()
    from mistral.checkpoint import write_checkpoint
    from mistral.quant import Quantization

    args = tiny("tiny-window")
    write_checkpoint(tmp_path / "q", "mlx", args, random_weights(args, seed=4),
                     quantize=Quantization(bits, 32))  # fmt: skip
    rows = random_rows([45, 7, 20], args.vocab_size, 0)
    cpu = mistral.load(tmp_path / "q", device="cpu", dtype="float32")
    gpu = mistral.load(tmp_path / "q", device="cuda", dtype="float32")
    assert max_diff(gpu.logits(rows), cpu.logits(rows)) <= 1e-4
    import torch

    on = {d: mistral.load(tmp_path / "q", device=d, dtype="bfloat16") for d in ("cpu", "cuda")}
    wq = {d: m.runner.model.layers[0].attention.wq.weight_of().cpu() for d, m in on.items()}
    assert torch.equal(wq["cpu"], wq["cuda"])  # dequantized in bfloat16, bit for bit


def test_cuda_fp8_products_match_the_cpus(tmp_path):
    """--fp8 scaled on CUDA (torch._scaled_mm with float32 sums per block of 32 inputs): the
    CPU's FP8 products, up to the float sums' order (an activation near a rounding edge of e4m3
    may land on the other side): far closer to them than the dequantized weights' logits are."""
    cuda_or_skip()
    from tests.test_fp8 import fp8_folder

    args = tiny("tiny-window")
    fp8_folder(tmp_path / "f", args)
    rows = random_rows([45, 7, 20], args.vocab_size, 0)
    load = lambda d, fp8: mistral.load(tmp_path / "f", device=d, dtype="float32", fp8=fp8)  # noqa: E731
    cpu, gpu = load("cpu", "scaled").logits(rows), load("cuda", "scaled").logits(rows)
    apart = max_diff(cpu, load("cpu", "keep").logits(rows))
    assert max_diff(gpu, cpu) <= 0.1 * apart
