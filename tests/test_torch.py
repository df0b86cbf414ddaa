"""Both backends against Hugging Face transformers directly (the pair fixture runs each), and the
PyTorch backend's own devices, kernels and compiled step."""

import subprocess
import sys

import numpy as np
import pytest

import mistral
from mistral import MistralError
from mistral.checkpoint import write_checkpoint
from mistral.contract import BACKENDS
from mistral.weights import RawTensor, random_weights
from tests.helpers import (
    ROOT,
    hf_greedy,
    hf_logits,
    hf_model,
    hf_to_mistral_folder,
    max_diff,
    random_rows,
    save_hf,
    tiny,
)

CONFIGS = ["tiny-dense", "tiny-window", "tiny-moe"]
TOL = 1e-4


@pytest.fixture(scope="module", params=[(c, b) for b in BACKENDS for c in CONFIGS], ids=str)
def pair(request, tmp_path_factory):
    """(HF model, our model on a backend, loaded from the Mistral folder converted from HF's
    save_pretrained)."""
    config, backend = request.param
    args = tiny(config)
    ref = hf_model(args, seed=CONFIGS.index(config))
    d = tmp_path_factory.mktemp(config)
    hf_to_mistral_folder(save_hf(ref, d / "hf"), d / "mistral")
    return ref, mistral.load(d / "mistral", backend=backend, device="cpu", dtype="float32")


def test_one_row_matches_hf(pair):
    ref, ours = pair
    rows = random_rows([12], ours.args.vocab_size, 0)
    assert max_diff(ours.logits(rows), hf_logits(ref, rows)) <= TOL


def test_ragged_batch_longer_than_the_window_matches_hf(pair):
    ref, ours = pair
    rows = random_rows([45, 3, 17, 30], ours.args.vocab_size, 1)
    if ours.args.sliding_window:
        assert max(map(len, rows)) > 2 * ours.args.sliding_window
    assert max_diff(ours.logits(rows), hf_logits(ref, rows)) <= TOL


@pytest.mark.parametrize("chunk", [1, 5, 16, 23])
def test_chunked_prefill_matches_hf(pair, chunk):
    ref, ours = pair
    rows = random_rows([50, 21], ours.args.vocab_size, 2)
    assert max_diff(ours.logits(rows, chunk_size=chunk), hf_logits(ref, rows)) <= TOL


def test_greedy_generation_equals_hf_past_the_window(pair):
    ref, ours = pair
    prompt = random_rows([20], ours.args.vocab_size, 3)[0]
    n = 32 + (ours.args.sliding_window or 0)
    assert ours.generate([prompt], n) == [hf_greedy(ref, prompt, n)]
    ours_chunked = ours.generate([prompt], n, chunk_size=7)
    assert ours_chunked == [hf_greedy(ref, prompt, n)]


def test_ragged_batch_generation_equals_rows_alone(pair):
    _, ours = pair
    prompts = random_rows([5, 19, 11], ours.args.vocab_size, 4)
    together = ours.generate(prompts, 40)
    assert together == [ours.generate([p], 40)[0] for p in prompts]


def test_cached_decode_equals_one_full_forward(pair):
    _, ours = pair
    prompt = random_rows([9], ours.args.vocab_size, 5)[0]
    new = ours.generate([prompt], 30)[0]
    full = ours.logits([prompt + new])[0]
    # The logits the decode loop saw are those of one forward over the whole sequence.
    assert new == full[len(prompt) - 1 : -1].argmax(-1).tolist()
    steps = ours.logits([prompt + new], chunk_size=1)[0]
    assert float(np.abs(steps - full).max()) <= 1e-5


def test_eos_stops_a_row_and_is_kept(pair):
    _, ours = pair
    prompt = random_rows([6], ours.args.vocab_size, 6)[0]
    free = ours.generate([prompt], 10)[0]
    stopped = ours.generate([prompt], 10, eos_id=free[3])[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_sampling_is_seeded(pair):
    _, ours = pair
    prompt = random_rows([6], ours.args.vocab_size, 7)[0]
    a = ours.generate([prompt], 20, temperature=1.0, top_p=0.9, seed=3)
    assert a == ours.generate([prompt], 20, temperature=1.0, top_p=0.9, seed=3)
    assert a != ours.generate([prompt], 20, temperature=1.0, top_p=0.9, seed=4)


def test_pth_checkpoint_loads_like_safetensors(tmp_path):
    import torch

    args = tiny("tiny-window")
    weights = random_weights(args, seed=2, dtype="bfloat16")
    write_checkpoint(tmp_path / "st", "mistral", args, weights)
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "params.json").write_text((tmp_path / "st" / "params.json").read_text())
    state = {
        k: torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16).reshape(t.shape)
        for k, t in weights.items()
    }
    torch.save(state, tmp_path / "pth" / "consolidated.00.pth")
    rows = random_rows([20], args.vocab_size, 9)
    a = mistral.load(tmp_path / "st", device="cpu", dtype="float32").logits(rows)
    b = mistral.load(tmp_path / "pth", device="cpu", dtype="float32").logits(rows)
    assert max_diff(a, b) == 0.0


def test_import_mistral_leaves_frameworks_out():
    code = "import sys, mistral; print(sorted({'torch', 'mlx'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.stdout.strip() == "[]", out.stderr


@pytest.fixture(scope="module")
def small():
    args = tiny("tiny-window")
    return mistral.from_tensors(args, random_weights(args), device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "batch, message",
    [
        ([], "the batch is empty"),
        ([[1, 2], []], "row 1 is empty"),
        ([[1, 256]], "token id 256 is outside the vocabulary"),
        ([[-1]], "token id -1 is outside"),
    ],
)
def test_bad_token_input_is_named(small, batch, message):
    with pytest.raises(MistralError, match=message):
        small.logits(batch)


def test_checkpoint_problems_are_listed(tmp_path):
    args = tiny("tiny-dense")
    weights = random_weights(args)
    weights.pop("layers.1.attention.wk.weight")
    weights["layers.0.extra.weight"] = weights["norm.weight"]
    weights["output.weight"] = RawTensor("float32", np.zeros((3, 64), np.float32))
    write_checkpoint(tmp_path, "mistral", args, weights)
    with pytest.raises(MistralError) as e:
        mistral.load(tmp_path, device="cpu")
    msg = str(e.value)
    assert "missing: layers.1.attention.wk.weight" in msg
    assert "unexpected: layers.0.extra.weight" in msg
    assert "wrong shape: output.weight (3, 64) != (256, 64)" in msg


@pytest.mark.parametrize("device, message", [("cuda", "not available"), ("tpu", "unknown torch")])
def test_bad_devices_are_refused(device, message):
    args = tiny("tiny-dense")
    with pytest.raises(MistralError, match=message):
        mistral.from_tensors(args, random_weights(args), device=device)


@pytest.mark.parametrize(
    "config, outgrown", [("tiny-window", False), ("tiny-moe", True), ("tiny-latent", True)]
)
def test_compiled_decode_step_gives_the_same_logits(monkeypatch, config, outgrown):
    """--compile: torch.compile of the static-shape decode step (a CUDA graph on CUDA); MoE
    layers then gather their chosen experts instead of looping with host syncs. With weights
    taken as larger than the CPU cache, the products are the oneDNN op (on x86), compiled too."""
    import backends.torch.kernels as kernels

    if outgrown:
        monkeypatch.setattr(kernels, "cpu_cache_bytes", lambda: 0)
    args = tiny(config)
    weights = random_weights(args, seed=12)
    eager = mistral.from_tensors(args, weights, device="cpu")
    compiled = mistral.from_tensors(args, weights, device="cpu", compile=True)
    assert compiled.runner.decode_model is not compiled.runner.model
    layers = compiled.runner.model.layers
    assert all(
        b.feed_forward.stacked is not None for i, b in enumerate(layers) if args.moe_layer(i)
    )
    rows = random_rows([10, 7], args.vocab_size, 10)
    tokens = compiled.generate(rows, 24)
    assert tokens == eager.generate(rows, 24)
    full = [r + t for r, t in zip(rows, tokens, strict=True)]
    assert max_diff(compiled.logits(full, chunk_size=1), eager.logits(full, chunk_size=1)) <= 1e-5


def test_cpu_float32_products_go_to_onednn(monkeypatch):
    """On x86 CPUs float32 F.linear runs on MKL, which is slow on AMD processors; the Linear layers
    use oneDNN's inner product there once the weights outgrow the last-level cache (in the cache
    MKL's cheaper calls win). Other dtypes and devices keep F.linear."""
    import platform

    import torch
    import torch.nn.functional as F

    import backends.torch.kernels as kernels
    from backends.torch.model import Linear
    from mistral.measure import cpu_cache_bytes

    cpu, big = torch.device("cpu"), cpu_cache_bytes() + 1
    assert kernels.linear_kernel(cpu, torch.bfloat16, big) is None
    assert kernels.linear_kernel(torch.device("meta"), torch.float32, big) is None
    assert kernels.linear_kernel(cpu, torch.float32, big - 1) is None  # read from the cache
    kernel = kernels.linear_kernel(cpu, torch.float32, big)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert kernel is None
        return
    assert kernel is kernels.onednn_linear()
    for x_shape, rows in [((1, 1, 512), 1537), ((2, 37, 64), 96), ((3, 64), 5)]:
        x, w = torch.randn(x_shape), torch.randn(rows, x_shape[-1])
        # The same products summed in another order: float32 rounding apart, relative to the
        # scale of the outputs (a single output near zero has no relative precision to keep).
        ref = F.linear(x, w)
        assert kernel(x, w).shape == ref.shape
        assert (kernel(x, w) - ref).abs().max() <= 1e-6 * ref.abs().max()

    args = tiny("tiny-dense")
    weights = random_weights(args, seed=4)

    def linears(model):
        return [m for m in model.runner.model.modules() if isinstance(m, Linear)]

    small = linears(mistral.from_tensors(args, weights, device="cpu"))
    assert len(small) == 7 * args.n_layers + 1 and all(m.kernel is None for m in small)
    monkeypatch.setattr(kernels, "cpu_cache_bytes", lambda: 0)  # as if the weights outgrew it
    model = mistral.from_tensors(args, weights, device="cpu")
    assert all(m.kernel is kernels.onednn_linear() for m in linears(model))
    rows = random_rows([20, 5], args.vocab_size, 2)
    assert max_diff(model.logits(rows), mistral.from_tensors(args, weights).logits(rows)) <= 1e-5


def test_bad_generation_options_are_named(small):
    with pytest.raises(MistralError, match="chunk_size must be positive"):
        small.logits([[1, 2, 3]], chunk_size=0)
    with pytest.raises(MistralError, match="top_p must be in"):
        small.generate([[1, 2]], 4, top_p=0.0)
    with pytest.raises(MistralError, match="max_tokens must be >= 0"):
        small.generate([[1, 2]], -1)
