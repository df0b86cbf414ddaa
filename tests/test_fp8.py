"""Hugging Face's block-quantized FP8 checkpoints (float8 e4m3 codes, a weight_scale_inv per block
of 128 x 128): read, dequantized as torch decodes e4m3, and run on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mistral
from mistral import hf, hf_config
from mistral.checkpoint import read_checkpoint, write_checkpoint
from mistral.fp8 import E4M3, FP8Tensor
from mistral.safetensors_file import write_tensors
from mistral.weights import RawTensor, from_numpy, random_weights
from tests.helpers import assert_compiled_agrees, max_diff, random_rows, run_cli, tiny


def test_the_e4m3_table_is_torchs():
    import torch

    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(E4M3), np.isnan(theirs))
    assert np.array_equal(E4M3[~np.isnan(E4M3)], theirs[~np.isnan(theirs)])


def test_torch_reads_e4m3_as_the_table_does():
    """torch's kept FP8 layers: every finite code through bfloat16's bits as the table, also
    where float32 flushes subnormals (then through torch's cast), and a layer that holds a NaN
    code reads it as NaN (through torch's cast)."""
    import torch

    from backends.torch.quantized import FP8Linear, e4m3_values

    codes = torch.arange(256, dtype=torch.uint8)
    finite = ~np.isnan(E4M3)
    assert np.array_equal(e4m3_values(codes[finite], finite=True).numpy(), E4M3[finite])
    assert np.array_equal(
        np.signbit(e4m3_values(codes[finite], True).numpy()), np.signbit(E4M3[finite])
    )
    subnormal = codes[1:8]  # 2^-9 to 7 * 2^-9: flushed to 0 where float32 flushes subnormals
    try:
        torch.set_flush_denormal(True)
        assert np.array_equal(e4m3_values(subnormal, finite=True).numpy(), E4M3[1:8])
    finally:
        torch.set_flush_denormal(False)
    for code, nan in ((0x7E, False), (0x7F, True), (0xFF, True)):
        raw = np.full((16, 16), code, np.uint8)
        t = FP8Tensor(
            RawTensor("float8_e4m3", raw), from_numpy(np.ones((1, 1)), "float32"), (16, 16)
        )
        layer = FP8Linear.of(t, torch.float32, torch.device("cpu"))
        assert layer.finite is not nan
        assert np.isnan(layer.weight_of().numpy()).all() == nan


def test_mlx_reads_e4m3_as_the_table_does():
    """MLX's kept FP8 layers decode their bytes by mx.from_fp8: every code as our table."""
    import mlx.core as mx

    theirs = np.array(mx.from_fp8(mx.array(np.arange(256, dtype=np.uint8)), mx.float32))
    assert np.array_equal(np.isnan(E4M3), np.isnan(theirs))
    assert np.array_equal(E4M3[~np.isnan(E4M3)], theirs[~np.isnan(theirs)])


def fp8_folder(path, args, block: int = 32, weights=None):
    """An FP8 folder made as DeepSeek-V3's are: each 2-D projection's blocks scaled to e4m3's
    range (448), the codes cast by torch; returns the weights as torch dequantizes them. The
    weights: ``weights`` (named by checkpoint keys), else seeded random ones."""
    import torch

    tensors = hf.tensors_to_hf(args, weights or random_weights(args, seed=2))
    stored, expected = {}, {}
    for name, t in tensors.items():
        w = torch.from_numpy(np.array(t.to_numpy(), dtype=np.float32))
        if w.ndim != 2 or "embed" in name or "lm_head" in name:
            stored[name], expected[name] = t, w.numpy()
            continue
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        padded = torch.zeros(rows * block, cols * block)
        padded[: w.shape[0], : w.shape[1]] = w
        blocks = padded.view(rows, block, cols, block)
        scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)  # (rows, cols)
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        full = full[: w.shape[0], : w.shape[1]]
        codes = (w / full).to(torch.float8_e4m3fn)
        stored[name] = RawTensor("float8_e4m3", codes.view(torch.uint8).numpy())
        stored[name + "_scale_inv"] = from_numpy(scale.numpy())
        expected[name] = (codes.float() * full).numpy()
    path.mkdir()
    write_tensors(path / "model.safetensors", list(stored.items()))
    config = hf_config.config_from_args(args, "float32")
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (path / "config.json").write_text(json.dumps(config))
    return {k: from_numpy(v) for k, v in expected.items()}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_fp8_folder_runs_as_its_dequantized_weights(tmp_path, backend):
    args = tiny("tiny-window")
    expected = fp8_folder(tmp_path / "fp8", args)
    ckpt = read_checkpoint(tmp_path / "fp8")
    assert isinstance(ckpt.tensors["layers.0.attention.wq.weight"], FP8Tensor)
    write_checkpoint(tmp_path / "ref", "hf", args, hf.tensors_from_hf(args, expected, "ref"))
    rows = random_rows([args.sliding_window + 7, 9], args.vocab_size, 3)
    ours = mistral.load(tmp_path / "fp8", backend=backend, device="cpu", dtype="float32")
    ref = mistral.load(tmp_path / "ref", backend=backend, device="cpu", dtype="float32")
    assert max_diff(ours.logits(rows), ref.logits(rows)) == 0.0  # the same weights, bit for bit
    plain = mistral.from_tensors(args, random_weights(args, seed=2), backend, "cpu", "float32")
    assert max_diff(ours.logits(rows), plain.logits(rows)) > 1e-4  # and e4m3 did round them
    # the projections kept as e4m3 bytes, a scale per block beside them: under half the bytes
    wq = ours.runner.model.layers[0].attention.wq
    assert type(wq).__name__ == "FP8Linear"
    if backend == "torch":
        from tests.test_quantized import torch_bytes

        assert wq.codes.dtype.itemsize == 1 and torch_bytes(ours) < 0.5 * torch_bytes(ref)
    else:
        from mlx.utils import tree_flatten

        def mlx_bytes(model):
            return sum(a.nbytes for _, a in tree_flatten(model.runner.model.parameters()))

        assert wq.weight.itemsize == 1 and mlx_bytes(ours) < 0.5 * mlx_bytes(ref)
    # --fp8 dequantize: once, at load, into plain layers; the same logits
    whole = mistral.load(tmp_path / "fp8", backend=backend, device="cpu", fp8="dequantize")
    assert type(whole.runner.model.layers[0].attention.wq).__name__ == "Linear"
    assert max_diff(whole.logits(rows), ours.logits(rows)) == 0.0


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c, t: c["quantization_config"].update(activation_scheme="per_channel"),
            "dynamic or static",
        ),
        (lambda c, t: c["quantization_config"].update(weight_block_size=[0, 32]), "two positive"),
        (lambda c, t: t.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"), "without its"),
        (
            lambda c, t: t.update(
                {
                    "model.layers.0.self_attn.q_proj.weight_scale_inv": from_numpy(
                        np.ones((1, 1), np.float32)
                    )
                }
            ),
            "blocks",
        ),
        (
            lambda c, t: t.update(
                {"model.norm.weight_scale_inv": from_numpy(np.ones(1, np.float32))}
            ),
            "scales",
        ),
    ],
)
def test_hostile_fp8_folders_are_one_line(tmp_path, change, message):
    from mistral.safetensors_file import read_tensors

    args = tiny("tiny-dense")
    fp8_folder(tmp_path / "f", args)
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    tensors = dict(read_tensors(tmp_path / "f" / "model.safetensors"))
    change(config, tensors)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    items = [(k, RawTensor(t.dtype, np.array(t.source))) for k, t in tensors.items()]
    write_tensors(tmp_path / "g" / "model.safetensors", items)
    with pytest.raises(mistral.MistralError, match=message) as e:
        read_checkpoint(tmp_path / "g")
    assert "\n" not in str(e.value)


def test_info_shows_the_fp8_weights(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    fp8_folder(tmp_path / "f", tiny("tiny-dense"))
    run = [sys.executable, "-m", "mistral", "info", str(tmp_path / "f")]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0 and "fp8 e4m3, blocks of 32x32" in out.stdout, out.stderr


def mistral_fp8_folder(path, args):
    """A folder in Mistral's own FP8 layout (Mistral Small 4's): params.json's quantization
    block, each projection's e4m3 codes with one qscale_weight and a qscale_act; the names
    Mistral's (experts beside attention). Returns the weights as torch dequantizes them."""
    import torch

    from mistral.checkpoint import mistral_names

    tensors, stored, expected = random_weights(args, seed=2), {}, {}
    for name, t in tensors.items():
        w = torch.from_numpy(t.to_numpy())
        if w.ndim != 2 or name.startswith(("tok_embeddings", "output")):
            stored[name], expected[name] = t, w.numpy()
            continue
        scale = (w.abs().max() / 448).clamp(min=1e-12)
        codes = (w / scale).to(torch.float8_e4m3fn)
        module = name.removesuffix(".weight")
        stored[name] = RawTensor("float8_e4m3", codes.view(torch.uint8).numpy())
        stored[module + ".qscale_weight"] = from_numpy(scale.numpy())
        stored[module + ".qscale_act"] = from_numpy(np.float32(0.5) * np.ones(()), "bfloat16")
        expected[name] = (codes.float() * scale).numpy()
    path.mkdir()
    write_tensors(path / "consolidated.safetensors", list(mistral_names(args, stored).items()))
    params = {
        **args.to_params(),
        "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
    }
    (path / "params.json").write_text(json.dumps(params))
    return {k: from_numpy(v) for k, v in expected.items()}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("config", ["tiny-window", "tiny-latent"])
def test_mistral_fp8_folders_run_as_their_dequantized_weights(tmp_path, backend, config):
    args = tiny(config)
    expected = mistral_fp8_folder(tmp_path / "fp8", args)
    ckpt = read_checkpoint(tmp_path / "fp8")
    assert ckpt.args == args
    assert isinstance(ckpt.tensors["layers.0.attention.wo.weight"], FP8Tensor)
    rows = random_rows([21, 9], args.vocab_size, 3)
    ours = mistral.load(tmp_path / "fp8", backend=backend, device="cpu", dtype="float32")
    ref = mistral.from_tensors(args, expected, backend, "cpu", "float32")
    assert max_diff(ours.logits(rows), ref.logits(rows)) == 0.0  # the same weights, bit for bit
    plain = mistral.from_tensors(args, random_weights(args, seed=2), backend, "cpu", "float32")
    assert max_diff(ours.logits(rows), plain.logits(rows)) > 1e-4  # and e4m3 did round them


@pytest.mark.parametrize(
    "block, message",
    [
        ({"qformat_weight": "int4"}, "is not supported"),
        ({"qformat_weight": "fp8_e4m3", "qscheme_act": "CHANNEL"}, "only per-tensor"),
        ("fp8", "is not supported"),
    ],
)
def test_mistral_quantization_blocks_that_are_not_read(tmp_path, block, message):
    args = tiny("tiny-dense")
    mistral_fp8_folder(tmp_path / "fp8", args)
    params = json.loads((tmp_path / "fp8" / "params.json").read_text())
    (tmp_path / "fp8" / "params.json").write_text(json.dumps({**params, "quantization": block}))
    with pytest.raises(mistral.MistralError, match=message) as e:
        read_checkpoint(tmp_path / "fp8")
    assert "params.json" in str(e.value) and "\n" not in str(e.value)


def test_a_mistral4_fp8_folder_with_static_activation_scales(tmp_path):
    """Mistral Small 4 as its Hugging Face folder ships: e4m3 codes with one scale per weight,
    static activation scales (left out: the weights are dequantized), and the experts fused per
    layer with one scale per expert. Both backends run the weights as torch dequantizes them."""
    import torch

    args = tiny("tiny-latent")
    stored, expected = {}, {}
    for name, t in hf.tensors_to_hf(args, random_weights(args, seed=2)).items():
        w = torch.from_numpy(RawTensor(t.dtype, t.data).to_numpy())
        if w.ndim == 1 or "embed" in name or "lm_head" in name or name.endswith("gate.weight"):
            stored[name] = RawTensor(t.dtype, np.asarray(t.data))
            continue
        per = w.abs().amax(dim=(-2, -1), keepdim=True) / 448  # one scale per (expert's) weight
        codes = (w / per).to(torch.float8_e4m3fn)
        stored[name] = RawTensor("float8_e4m3", codes.view(torch.uint8).numpy())
        base = name.removesuffix(".weight")
        scale = per.reshape(-1) if w.ndim == 3 else per.reshape(())
        suffix = "_scale_inv" if w.ndim == 3 else ".weight_scale_inv"
        stored[base + suffix] = from_numpy(scale.numpy())
        act = "_activation_scale" if w.ndim == 3 else ".activation_scale"
        stored[base + act] = from_numpy(np.full(scale.shape, 0.25, np.float32))
        deq = codes.float() * per
        if w.ndim == 3 and name.endswith("gate_up_proj"):
            half = deq.shape[1] // 2
            for e in range(deq.shape[0]):
                p = name.removesuffix("gate_up_proj")
                expected[f"{p}{e}.gate_proj.weight"] = deq[e, :half].numpy()
                expected[f"{p}{e}.up_proj.weight"] = deq[e, half:].numpy()
        elif w.ndim == 3:
            for e in range(deq.shape[0]):
                expected[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = deq[e].numpy()
        else:
            expected[name] = deq.numpy()
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in stored
    (tmp_path / "fp8").mkdir()
    write_tensors(tmp_path / "fp8" / "model.safetensors", list(stored.items()))
    config = hf_config.config_from_args(args, "bfloat16")
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": None,
    }
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    plain = {
        k: RawTensor(t.dtype, np.asarray(t.data))
        for k, t in stored.items()
        if t.dtype != "float8_e4m3"
    }
    plain = {k: t for k, t in plain.items() if "scale" not in k}
    plain |= {k: from_numpy(v) for k, v in expected.items()}
    reference = hf.tensors_from_hf(args, plain, "reference")
    rows = random_rows([21, 9], args.vocab_size, 3)
    for backend in ("torch", "mlx"):
        ours = mistral.load(tmp_path / "fp8", backend=backend, device="cpu", dtype="float32")
        ref = mistral.from_tensors(args, reference, backend, "cpu", "float32")
        assert max_diff(ours.logits(rows), ref.logits(rows)) == 0.0, backend


def test_a_weight_of_one_scale_leaves_the_others_blocks(tmp_path):
    """One weight's scale for the whole of it (a scalar) does not make the weights read after
    it whole-weight too: each is checked against the folder's blocks."""
    from mistral.safetensors_file import read_tensors

    args = tiny("tiny-window")
    fp8_folder(tmp_path / "fp8", args)
    path = tmp_path / "fp8" / "model.safetensors"
    tensors = {k: RawTensor(t.dtype, np.array(t.data)) for k, t in read_tensors(path).items()}
    first = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    assert list(tensors).index(first) < list(tensors).index("model.layers.1.mlp.down_proj.weight")
    tensors[first] = from_numpy(np.full((), 0.01, np.float32))
    path.unlink()
    write_tensors(path, list(tensors.items()))
    ckpt = read_checkpoint(tmp_path / "fp8")
    assert ckpt.tensors["layers.0.attention.wq.weight"].scale_inv.shape == (1, 1)
    assert ckpt.tensors["layers.1.feed_forward.w2.weight"].block == (32, 32)


def test_fused_expert_scales_must_be_one_per_expert():
    """A fused layer's scales split with its codes, one per expert: a count that lies is named."""
    codes = RawTensor("float8_e4m3", np.zeros((4, 8, 6), np.uint8))
    scales = from_numpy(np.ones((3, 1, 1), np.float32))  # 3 scales for 4 experts
    name = "model.layers.1.mlp.experts.gate_up_proj"
    with pytest.raises(mistral.MistralError, match="is not one per expert") as e:
        hf.unstack_experts({name: codes, name + "_scale_inv": scales}, "src")
    assert "\n" not in str(e.value)
    split = hf.unstack_experts(
        {name: codes, name + "_scale_inv": from_numpy(np.ones((4, 1, 1), np.float32))}, "src"
    )
    assert split["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (4, 6)
    assert split["model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"].shape == (1, 1)


def activations_reference(x: np.ndarray, width: int, act_scale: float | None):
    """The FP8 kernels' activation quantization, in numpy: per row and block of ``width``
    inputs, s = max(|x|, 1e-10) / 448 (or the static scale), codes = e4m3(x / s) rounded to the
    nearest value (ties to even) and saturated; -> (codes, (M, blocks) scales)."""
    from mistral.quant import e4m3_codes

    codes, scales = [], []
    for start in range(0, x.shape[-1], width):
        block = x[:, start : start + width]
        if act_scale is None:
            s = np.maximum(np.abs(block).max(-1, keepdims=True), np.float32(1e-10)) / 448
        else:
            s = np.full((len(x), 1), act_scale, np.float32)
        codes.append(e4m3_codes((block / s).astype(np.float32)))
        scales.append(s.astype(np.float32))
    return np.concatenate(codes, -1), np.concatenate(scales, -1)


def scaled_reference(x, codes, scales, width, act_scale):
    """DeepSeek-V3's FP8 GEMM in float64: each block of inputs' product of e4m3 values, times
    the activations' and the weight's scales of that block, summed over the blocks."""
    a, s = activations_reference(x, width, act_scale)
    y = np.zeros((len(x), len(codes)))
    for i, start in enumerate(range(0, x.shape[-1], width)):
        cols = slice(start, start + width)
        part = E4M3[a[:, cols]].astype(np.float64) @ E4M3[codes[:, cols]].astype(np.float64).T
        y += part * s[:, i : i + 1] * scales[:, i][None]
    return y


@pytest.mark.parametrize(
    "width, act_scale", [(32, None), (48, None), (50, None), (1 << 62, None), (1 << 62, 0.05)]
)
def test_fp8_products_are_the_fp8_kernels(width, act_scale):
    """torch's FP8 product (torch._scaled_mm per block of inputs) against the definition in
    numpy: the activations' codes bit for bit (torch's cast against a rounding of our own, ties
    and saturation included: the static 0.05 makes |x| / s pass 448), the product to float32
    sums. 100 inputs: the last block ragged in 32s and 48s, whole in 50s and in one block."""
    import torch

    from backends.torch.quantized import FP8Linear, activation_codes, scaled_product

    rng = np.random.default_rng(0)
    n = 100
    x = (rng.standard_normal((5, n)) * rng.choice([0.01, 1, 30], size=(5, 1))).astype(np.float32)
    x[1, :40] = 0  # an all-zero block: the 1e-10 floor, no 0 / 0
    codes = rng.integers(0, 256, size=(24, n)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN codes
    blocks = -(-n // min(width, n))
    scales = rng.uniform(0.001, 0.01, size=(24, blocks)).astype(np.float32)
    t = torch.from_numpy(x)
    got, s = activation_codes(t[:, : min(width, n)], act_scale)
    want, want_s = activations_reference(x[:, : min(width, n)], width, act_scale)
    assert np.array_equal(got.view(torch.uint8).numpy(), want)
    assert np.array_equal(s.numpy()[:, 0], want_s[:, 0])
    block_scales = torch.from_numpy(scales.T.copy())
    y = scaled_product(t, torch.from_numpy(codes), block_scales, width, act_scale).numpy()
    ref = scaled_reference(x, codes, scales, width, act_scale)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    # the dequantized weight (whole blocks broadcast, a ragged last one repeated): bit for bit
    fp8 = FP8Tensor(RawTensor("float8_e4m3", codes), from_numpy(scales), (1, min(width, n)))
    layer = FP8Linear.of(fp8, torch.float32, torch.device("cpu"), scaled=True)
    assert np.array_equal(layer.weight_of().numpy(), fp8.dequantized("float32").to_numpy())


@pytest.mark.parametrize("layout, config", [("hf", "tiny-window"), ("mistral", "tiny-latent")])
def test_fp8_scaled_multiplies_every_fp8_projection_in_fp8(tmp_path, layout, config):
    """--fp8 scaled on whole models (blocks of 32; Mistral's per-tensor scales with a static
    qscale_act of 0.5, latent attention and experts): the dequantized model whose FP8
    projections see their inputs quantized as the kernels do (numpy) gives the same logits."""
    import torch

    from backends.torch.quantized import FP8Linear

    args = tiny(config)
    (fp8_folder if layout == "hf" else mistral_fp8_folder)(tmp_path / "f", args)
    rows = random_rows([21, 9], args.vocab_size, 3)
    scaled = mistral.load(tmp_path / "f", device="cpu", dtype="float32", fp8="scaled")
    plain = mistral.load(tmp_path / "f", device="cpu", dtype="float32")
    apart = max_diff(scaled.logits(rows), plain.logits(rows))
    assert apart > 1e-2  # the activations' e4m3 rounding shows

    def quantized_inputs(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).numpy()
        codes, s = activations_reference(x, module.width, module.act_scale)
        width = min(module.width, x.shape[-1])
        values = E4M3[codes] * np.repeat(s, width, axis=-1)[:, : x.shape[-1]]
        return (torch.from_numpy(values).view_as(inputs[0]),)

    fp8 = [m for m in plain.runner.model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) >= 4 * args.n_layers
    for module in fp8:
        module.register_forward_pre_hook(quantized_inputs)
    assert max_diff(scaled.logits(rows), plain.logits(rows)) <= 1e-4 * apart
    if layout == "mistral":
        assert {m.act_scale for m in fp8} == {0.5}
    # MLX, with no FP8 product, emulates it in float32 (its own e4m3 rounding, mx.to_fp8)
    mlx = mistral.load(tmp_path / "f", backend="mlx", device="cpu", dtype="float32", fp8="scaled")
    assert max_diff(mlx.logits(rows), scaled.logits(rows)) <= 1e-4 * apart


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_a_static_activation_scale_must_be_a_positive_number(tmp_path, value):
    """A qscale_act that no product could use is refused at reading, in one line."""
    from mistral.safetensors_file import read_tensors

    mistral_fp8_folder(tmp_path / "f", tiny("tiny-dense"))
    path = tmp_path / "f" / "consolidated.safetensors"
    tensors = {k: RawTensor(t.dtype, np.array(t.data)) for k, t in read_tensors(path).items()}
    name = next(k for k in tensors if k.endswith(".qscale_act"))
    tensors[name] = from_numpy(np.full((), value, np.float32))
    path.unlink()
    write_tensors(path, list(tensors.items()))
    with pytest.raises(mistral.MistralError, match="not a positive scale") as e:
        read_checkpoint(tmp_path / "f")
    assert name in str(e.value) and "\n" not in str(e.value)


def test_fp8_scaled_is_refused_where_it_cannot_run(tmp_path):
    """generate --fp8 scaled runs on both backends here; a device without FP8 products is named
    in one line, exit 1."""
    from mistral.checkpoint import DEFAULT_MODEL

    fp8_folder(tmp_path / "f", read_checkpoint(DEFAULT_MODEL).args)
    argv = ["generate", "--model", str(tmp_path / "f"), "--tokenizer"]
    argv += [str(DEFAULT_MODEL / "tokenizer.model"), "--prompt", "In"]
    for backend in ("torch", "mlx"):
        out = run_cli(*argv, "--backend", backend, "--device", "cpu", "--fp8", "scaled",
                      "--max-tokens", "4")  # fmt: skip
        assert out.returncode == 0, out.stderr
    # a device whose products fail (CUDA before 8.9 answers so) is named in one line
    broken = "import torch; torch._scaled_mm = lambda *a, **k: (_ for _ in ()).throw("
    broken += "RuntimeError('torch._scaled_mm is only supported on CUDA devices with compute "
    broken += "capability >= 9.0 or 8.9'))"
    out = run_cli(*argv, "--device", "cpu", "--fp8", "scaled", code=broken)
    assert out.returncode == 1 and "no FP8 products on cpu" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_diff_holds_fp8_sides_to_their_tolerance(tmp_path):
    """diff of the embedded model against its FP8 conversion (blocks of 128), the activations
    quantized too (--b-fp8 scaled): the sides agree within "fp8 scaled", the error plainly there;
    one layer's scales spoiled is named at that layer."""
    import dataclasses as dc

    from mistral.checkpoint import DEFAULT_MODEL
    from mistral.diff import load_side, precision_of, run_diff
    from mistral.tokenizer import Tokenizer

    full = read_checkpoint(DEFAULT_MODEL)
    fp8_folder(tmp_path / "f", full.args, 128, dict(full.tensors))
    fp8 = read_checkpoint(tmp_path / "f")
    assert precision_of(fp8, "float32") == "fp8"
    precisions = ("float32", precision_of(fp8, "float32", "scaled"))
    assert precisions[1] == "fp8 scaled"
    tokens = Tokenizer(DEFAULT_MODEL / "tokenizer.model").encode("And it came to pass, when")
    a = load_side("torch:cpu:float32", full)
    name, b = load_side("torch:cpu:float32", fp8, "scaled")
    assert name.endswith("(fp8 scaled)")
    report = run_diff(a, (name, b), tokens, precisions=precisions)
    assert report.agree and max(t.rel for t in report.taps) > 2e-2, report.table()
    t = fp8.tensors["layers.2.attention.wo.weight"]
    spoiled = dc.replace(t, scale_inv=from_numpy(t.scale_inv.to_numpy() * 4))
    bad = dc.replace(fp8, tensors={**fp8.tensors, "layers.2.attention.wo.weight": spoiled})
    report = run_diff(
        a, load_side("torch:cpu:float32", bad, "scaled"), tokens, precisions=precisions
    )
    assert not report.agree and report.first_divergence == "layers.2.attention"


def test_diff_holds_two_sides_of_one_folder_to_their_dtypes(tmp_path):
    """diff of one FP8 folder on torch and MLX, both multiplying in FP8: the codes are the same
    on both sides, so each tap is held to float32's 1e-5, not to the quantization's 0.2; a
    side dequantizing against one multiplying in FP8 is held to fp8 scaled's."""
    fp8_folder(tmp_path / "f", tiny("tiny-window"))
    run = ["diff", "--model", str(tmp_path / "f"), "--tokens", "1,5,9,200,17,3,44",
           "--a", "torch:cpu:float32", "--b", "mlx:cpu:float32", "--a-fp8", "scaled"]  # fmt: skip
    for b_fp8, tolerance in (("scaled", 1e-5), ("keep", 0.2)):
        out = tmp_path / f"{b_fp8}.json"
        done = run_cli(*run, "--b-fp8", b_fp8, "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(out.read_text())
        assert report["agree"] and {t["tolerance"] for t in report["taps"]} == {tolerance}


def test_fp8_scaled_refuses_shapes_cuda_cannot_multiply():
    """CUDA's FP8 products take blocks of inputs and outputs in multiples of 16: a ragged last
    block of 72 is named in one line before anything is built (the CPU takes any shape)."""
    import torch

    from backends.torch.quantized import check_fp8_shape

    def weight(out, n, block):
        blocks = (-(-out // block), -(-n // block))
        codes = RawTensor("float8_e4m3", np.zeros((out, n), np.uint8))
        return FP8Tensor(codes, from_numpy(np.ones(blocks, np.float32)), (block, block))

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    check_fp8_shape("w", weight(256, 512, 128), cuda)
    check_fp8_shape("w", weight(100, 200, 128), cpu)
    for out, n in ((256, 200), (100, 256)):
        with pytest.raises(mistral.MistralError, match="multiples of 16") as e:
            check_fp8_shape("layers.0.attention.wq.weight", weight(out, n, 128), cuda)
        assert "layers.0.attention.wq.weight" in str(e.value) and "\n" not in str(e.value)


def test_fp8_modes_are_for_our_backends_and_fp8_folders(tmp_path):
    """--b-fp8 on an outside reference, or --fp8 dequantize on a folder without FP8 weights, is
    refused in one line rather than ignored."""
    from mistral.diff import load_side

    args = tiny("tiny-dense")
    fp8_folder(tmp_path / "f", args)
    with pytest.raises(mistral.MistralError, match="is for our backends") as e:
        load_side("hf:cpu:float32", read_checkpoint(tmp_path / "f"), "scaled")
    assert "\n" not in str(e.value)
    with pytest.raises(mistral.MistralError, match="fp8 dequantize is for FP8 weights"):
        mistral.from_tensors(args, random_weights(args), device="cpu", fp8="dequantize")


def test_compiled_fp8_layers_run_in_one_graph(tmp_path):
    """--compile on an FP8 folder kept in FP8: one graph (the fast CPU read of the codes has no
    place in a compiled one), the greedy tokens of eager, logits to float32 rounding."""
    args = tiny("tiny-dense")
    folder = tmp_path / "fp8"
    fp8_folder(folder, args)
    eager = mistral.load(folder, device="cpu", dtype="float32")
    compiled = mistral.load(folder, device="cpu", dtype="float32", compile=True)
    assert type(compiled.runner.model.layers[0].attention.wq).__name__ == "FP8Linear"
    assert_compiled_agrees(eager, compiled, random_rows([9, 6], args.vocab_size, 4), 8)
