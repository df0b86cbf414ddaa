"""mlx-lm's affine-quantized folders on both backends: the codes unpacked bit for bit as
mx.dequantize does, and logits within 1e-4 of mlx-lm's on the same folder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import mistral
from mistral.checkpoint import read_checkpoint, write_checkpoint
from mistral.hf_tokenizer import tokenizer_files
from mistral.quant import Quantization, QuantizedTensor, dequantize, quantize
from mistral.tokenizer import Tokenizer
from mistral.weights import RawTensor, from_numpy, random_weights
from tests.helpers import (
    ROOT,
    assert_compiled_agrees,
    max_diff,
    mlx_lm_logits,
    random_rows,
    tiny,
)

TOKENIZER = ROOT / "mistral" / "default_model" / "tokenizer.model"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpacking_equals_mx_dequantize_bit_for_bit(bits, dtype):
    import mlx.core as mx

    rng = np.random.default_rng(bits)
    for group in (32, 64, 128):
        w = mx.array(rng.standard_normal((24, 256), dtype=np.float32)).astype(getattr(mx, dtype))
        packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        expected = mx.dequantize(packed, scales, biases, group_size=group, bits=bits)
        expected = np.array(expected.astype(mx.float32))
        as_raw = [from_numpy(np.array(a.astype(mx.float32)), dtype) for a in (scales, biases)]
        codes = RawTensor("uint32", np.array(packed))
        t = QuantizedTensor(codes, *as_raw, Quantization(bits, group))
        assert t.shape == (24, 256)
        ours = dequantize(t, dtype)
        assert np.array_equal(ours, expected), (bits, group, dtype)
        assert np.array_equal(torch_dequantized(t, dtype), expected), (bits, group, dtype)


def torch_dequantized(t: QuantizedTensor, dtype: str) -> np.ndarray:
    """The weight as the torch backend's quantized layers compute it from the codes they keep,
    float32 numpy; its rows looked up as the embedding does give the same."""
    import torch

    from backends.torch import quantized
    from backends.torch.quantized import QuantizedEmbedding

    layer = QuantizedEmbedding.of(t, getattr(torch, dtype), torch.device("cpu"))
    w = layer.weight_of().float().numpy()
    rows = torch.tensor([[3, 0], [1, 3]])
    assert np.array_equal(layer(rows).float().numpy(), w[rows.numpy()])
    # The product dequantizes a block of rows at a time into one buffer (here 5 rows, the last
    # block ragged); times the identity it gives the weight back exactly.
    eye = torch.eye(w.shape[1], dtype=getattr(torch, dtype))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "ELEMENTS_AT_ONCE", 5 * w.shape[1])
        product = quantized.QuantizedLinear.forward(layer, eye)
    assert np.array_equal(product.float().numpy().T, w)
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_a_quantized_product_dequantizes_into_one_buffer(bits):
    """Every block of rows is dequantized into the same buffer: a block-sized allocation for
    each block left the heap fragmented, about 370 MiB more resident at a 3B shape's prefill."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from backends.torch import quantized

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = tree_flatten((args, kwargs))[0]
            held = {a.untyped_storage().data_ptr() for a in given if isinstance(a, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                    self.sizes.append(t.untyped_storage().nbytes())
            return out

    q = Quantization(bits, 64)
    w = np.random.default_rng(bits).standard_normal((64, 256), dtype=np.float32)
    packed, scales, biases = quantize(w, "bfloat16", q)
    t = QuantizedTensor(RawTensor("uint32", packed), scales, biases, q)
    layer = quantized.QuantizedLinear.of(t, torch.bfloat16, torch.device("cpu"))
    x = torch.ones(3, 256, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "ELEMENTS_AT_ONCE", 8 * 256)  # 8 blocks of 8 rows
        with Allocations() as seen:
            layer(x)
    block = 8 * 256 * 2  # a block of the weight in bfloat16
    assert sum(size >= block // 2 for size in seen.sizes) == 1, seen.sizes


def hf_folder(path, args, seed: int = 3):
    """A Hugging Face folder with our tokenizer files, which mlx-lm's convert needs."""
    write_checkpoint(path, "hf", args, random_weights(args, seed=seed))
    for name, body in tokenizer_files(Tokenizer(TOKENIZER)).items():
        (path / name).write_text(json.dumps(body))
    return path


def mlx_lm_quantized(tmp_path, args, bits: int, group: int, predicate=None):
    """mlx-lm's own quantized folder (its convert), and its model loaded back."""
    from mlx_lm import load
    from mlx_lm.convert import convert

    src = hf_folder(tmp_path / "hf", args)
    out = tmp_path / f"q{bits}"
    convert(
        str(src), str(out), quantize=True, q_bits=bits, q_group_size=group,
        dtype="float32", quant_predicate=predicate,
    )  # fmt: skip
    return out, load(str(out))[0]


BASE = dataclasses.replace(tiny("tiny-dense"), vocab_size=2048)


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (8, 64), (2, 32)])
def test_both_backends_match_mlx_lm_on_its_quantized_folder(tmp_path, bits, group):
    folder, theirs = mlx_lm_quantized(tmp_path, BASE, bits, group)
    ckpt = read_checkpoint(folder)
    assert isinstance(ckpt.tensors["layers.0.attention.wq.weight"], QuantizedTensor)
    assert isinstance(ckpt.tensors["tok_embeddings.weight"], QuantizedTensor)
    rows = random_rows([30, 9], BASE.vocab_size, 1)
    expected = mlx_lm_logits(theirs, rows)
    out = {}
    for backend in ("torch", "mlx"):
        model = mistral.load(folder, backend=backend, device="cpu", dtype="float32")
        out[backend] = model.logits(rows)
        assert max_diff(out[backend], expected) <= 1e-4, backend
        assert max_diff(model.logits(rows, chunk_size=7), expected) <= 1e-4, backend
    assert max_diff(out["torch"], out["mlx"]) <= 1e-4
    assert torch_bytes(model_of(folder)) <= sum(t.nbytes for t in ckpt.tensors.values())


def model_of(folder) -> mistral.Model:
    return mistral.load(folder, backend="torch", device="cpu", dtype="float32")


def torch_bytes(model: mistral.Model) -> int:
    """What the torch model holds: its parameters and buffers (a quantized weight's codes,
    scales and biases), each storage once."""
    module = model.runner.model
    held = {t.untyped_storage().data_ptr(): t.nbytes for t in module.parameters()}
    held |= {t.untyped_storage().data_ptr(): t.nbytes for t in module.buffers()}
    return sum(held.values())


def test_per_layer_overrides_and_a_layer_left_in_full_precision(tmp_path):
    def predicate(path, module, config=None):
        if path.endswith("layers.0.mlp.down_proj"):
            return False  # full precision
        if "self_attn.v_proj" in path:
            return {"bits": 8, "group_size": 64}
        return True

    folder, theirs = mlx_lm_quantized(tmp_path, BASE, 4, 32, predicate)
    block = json.loads((folder / "config.json").read_text())["quantization"]
    assert block["model.layers.1.self_attn.v_proj"] == {"bits": 8, "group_size": 64}
    ckpt = read_checkpoint(folder)
    assert not isinstance(ckpt.tensors["layers.0.feed_forward.w2.weight"], QuantizedTensor)
    assert ckpt.tensors["layers.1.attention.wv.weight"].q == Quantization(8, 64)
    rows = random_rows([20], BASE.vocab_size, 2)
    for backend in ("torch", "mlx"):
        model = mistral.load(folder, backend=backend, device="cpu", dtype="float32")
        assert max_diff(model.logits(rows), mlx_lm_logits(theirs, rows)) <= 1e-4, backend


def test_a_tied_quantized_table_serves_embedding_and_output(tmp_path):
    from mistral.args import Llama4ScalingArgs, YarnArgs

    args = dataclasses.replace(
        BASE,
        tied_embeddings=True,
        yarn=YarnArgs(factor=4.0, original_max_position_embeddings=8, apply_scale=False),
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=8, beta=0.2),
    )
    folder, theirs = mlx_lm_quantized(tmp_path, args, 4, 64)
    rows = random_rows([25], args.vocab_size, 3)
    for backend in ("torch", "mlx"):
        model = mistral.load(folder, backend=backend, device="cpu", dtype="float32")
        assert model.args.tied_embeddings
        assert max_diff(model.logits(rows), mlx_lm_logits(theirs, rows)) <= 1e-4, backend


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return mlx_lm_quantized(tmp_path_factory.mktemp("q"), BASE, 4, 32)[0]


def rewrite(folder, dst, edit_config=None, edit_tensors=None):
    """A copy of a quantized folder with its config or tensors changed."""
    from mistral.safetensors_file import read_tensors, write_tensors

    dst.mkdir()
    config = json.loads((folder / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = dict(read_tensors(folder / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    write_tensors(dst / "model.safetensors", list(tensors.items()))
    return dst


@pytest.mark.parametrize(
    "edit_config, edit_tensors, message",
    [
        (lambda c: c["quantization"].update(bits=7), None, "7 bits"),
        (lambda c: c["quantization"].update(mode="mxfp6"), None, "not supported yet"),
        (lambda c: c["quantization"].update(mode="nvfp4"), None, "4 bits in groups of 16"),
        (lambda c: c.pop("quantization"), None, "no quantization block"),
        (
            None,
            lambda t: t.pop("model.layers.0.self_attn.q_proj.scales"),
            "belongs to no quantized",
        ),
        (
            None,
            lambda t: t.update(
                {
                    f"model.layers.0.self_attn.q_proj.{part}": t[
                        f"model.layers.0.mlp.down_proj.{part}"
                    ]
                    for part in ("scales", "biases")
                }
            ),
            "do not fit",
        ),
        (lambda c: c.update(quantization=[4]), None, "must be an object"),
    ],
)
def test_hostile_quantized_folders_are_one_line(
    tmp_path, quantized, edit_config, edit_tensors, message
):
    with pytest.raises(mistral.MistralError, match=message) as e:
        read_checkpoint(rewrite(quantized, tmp_path / "bad", edit_config, edit_tensors))
    assert "\n" not in str(e.value)


def test_converting_a_quantized_folder_is_refused_in_one_line(tmp_path, quantized):
    ckpt = read_checkpoint(quantized)
    with pytest.raises(mistral.MistralError, match="quantized: converting them is not supported"):
        write_checkpoint(tmp_path / "x", "mistral", ckpt.args, ckpt.tensors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_our_quantizer_writes_mlx_s_codes_bit_for_bit(bits, dtype):
    import mlx.core as mx

    from mistral.quant import quantize

    rng = np.random.default_rng(10 + bits)
    for group in (32, 64, 128):
        w = rng.standard_normal((12, 256), dtype=np.float32) * rng.uniform(0.01, 3)
        w[0, :group] = 0.0  # a group of zeros, a constant group
        w[1, :group] = 0.5
        w = mx.array(w).astype(getattr(mx, dtype))
        packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        ours = quantize(np.array(w.astype(mx.float32)), dtype, Quantization(bits, group))
        assert np.array_equal(ours[0], np.array(packed)), (bits, group, dtype)
        assert np.array_equal(ours[1].to_numpy(), np.array(scales.astype(mx.float32)))
        assert np.array_equal(ours[2].to_numpy(), np.array(biases.astype(mx.float32)))


@pytest.mark.parametrize(
    "bits, group, dtype, mode",
    [(4, 64, None, "affine"), (3, 32, "float32", "affine"), (8, 128, None, "affine"),
     (4, 32, None, "mxfp4"), (8, 32, "bfloat16", "mxfp8")],  # nvfp4: its quantizer's test
)  # fmt: skip
def test_convert_quantize_writes_what_mlx_lm_writes(tmp_path, bits, group, dtype, mode):
    """`mistral convert --to mlx --quantize` on the embedded model: the same tensors, bit for bit,
    as mlx-lm's convert of the same model, a folder mlx_lm.load reads and both backends run."""
    import subprocess
    import sys

    from mlx_lm.convert import convert

    from mistral.safetensors_file import read_tensors

    default = ROOT / "mistral" / "default_model"
    cast = ["--dtype", dtype] if dtype else []

    def cli(*argv):
        run = [sys.executable, "-m", "mistral", "convert", *argv]
        out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
        assert out.returncode == 0, out.stderr

    cli(str(default), str(tmp_path / "ours"), "--to", "mlx", "--quantize", str(bits),
        "--group-size", str(group), "--mode", mode, *cast)  # fmt: skip
    cli(str(default), str(tmp_path / "hf"), "--to", "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "theirs"), quantize=True, q_bits=bits,
            q_group_size=group, q_mode=mode, dtype=dtype)  # fmt: skip
    ours = read_tensors(tmp_path / "ours" / "model.safetensors")
    theirs = {}
    for f in (tmp_path / "theirs").glob("model*.safetensors"):
        theirs.update(read_tensors(f))
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and np.array_equal(t.data, theirs[name].data), name
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": mode}
    rows = [Tokenizer(TOKENIZER).encode("And it came to pass")]
    expected = None
    for backend in ("torch", "mlx"):
        model = mistral.load(tmp_path / "ours", backend=backend, device="cpu", dtype="float32")
        tokens = model.generate(rows, 12)
        assert expected in (None, tokens)
        expected = tokens


def test_quantize_asks_for_mlx_s_layout_and_sane_bits(tmp_path):
    import subprocess
    import sys

    default = str(ROOT / "mistral" / "default_model")
    for argv, message in (
        (["--to", "hf", "--quantize", "4"], "--quantize writes mlx-lm's layout"),
        (["--to", "mlx", "--quantize", "7"], "7 bits"),
        (["--to", "mlx", "--quantize", "4", "--group-size", "48"], "groups of 48"),
        (["--to", "mlx", "--quantize", "3", "--mode", "mxfp4"], "mxfp4 is 4 bits"),
    ):
        run = [sys.executable, "-m", "mistral", "convert", default, str(tmp_path / "x"), *argv]
        out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
        assert out.returncode == 1 and message in out.stderr, (argv, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_modes_unpack_as_mx_dequantize(dtype, mode):
    """E2M1 (mxfp4, nvfp4) or E4M3 (mxfp8) codes times their group's scale, 2^(s - 127) or an
    E4M3 value (nvfp4), exact in float32, then rounded to the run's dtype: mx.dequantize's values
    (it gives bfloat16; asked for the dtype, that dtype). Some groups all zero, some tiny."""
    import mlx.core as mx

    from mistral.quant import FLOAT_MODES

    bits, group = FLOAT_MODES[mode]
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256), dtype=np.float32) * 4
    w[0, :64], w[1, :group] = 0.0, 1e-6 * w[1, :group]
    w = mx.array(w).astype(getattr(mx, dtype))
    packed, scales = mx.quantize(w, group_size=group, bits=bits, mode=mode)
    expected = mx.dequantize(packed, scales, group_size=group, bits=bits, mode=mode)
    expected = np.array(expected.astype(getattr(mx, dtype)).astype(mx.float32))
    t = QuantizedTensor(
        RawTensor("uint32", np.array(packed)),
        RawTensor("uint8", np.array(scales)),
        None,
        Quantization(bits, group, mode),
    )
    assert np.array_equal(dequantize(t, dtype), expected)
    assert np.array_equal(torch_dequantized(t, dtype), expected)


@pytest.mark.parametrize(
    "mode, bits, group", [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]
)
def test_both_backends_match_mlx_lm_on_a_float_mode_folder(tmp_path, mode, bits, group):
    from mlx_lm import load
    from mlx_lm.convert import convert

    src = hf_folder(tmp_path / "hf", BASE)
    convert(str(src), str(tmp_path / "q"), quantize=True, q_bits=bits, q_group_size=group,
            q_mode=mode, dtype="float32")  # fmt: skip
    theirs = load(str(tmp_path / "q"))[0]
    ckpt = read_checkpoint(tmp_path / "q")
    assert ckpt.tensors["layers.0.attention.wq.weight"].q.mode == mode
    rows = random_rows([30, 9], BASE.vocab_size, 1)
    expected = mlx_lm_logits(theirs, rows)
    for backend in ("torch", "mlx"):
        model = mistral.load(tmp_path / "q", backend=backend, device="cpu", dtype="float32")
        assert max_diff(model.logits(rows), expected) <= 1e-4, backend


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_our_float_mode_quantizer_writes_mlx_s_codes_bit_for_bit(dtype, mode):
    """E2M1 ties (frequent in bfloat16) go to the smaller magnitude, a negative that rounds to
    zero is +0, E4M3 ties to the even code keeping the sign; an all-zero group gets the exponent
    of 1 (mxfp4, mxfp8), the scale 0 (nvfp4); groups of tiny values: as mx.quantize."""
    import mlx.core as mx

    from mistral.quant import FLOAT_MODES, quantize_float

    bits, group = FLOAT_MODES[mode]
    rng = np.random.default_rng(11)
    for scale in (0.001, 1.0, 100.0):
        w = rng.standard_normal((12, 256), dtype=np.float32) * scale
        w[0, :32], w[1, :32] = 0.0, w[1, :32] * 1e-6
        w[2, :group] = np.round(w[2, :group] * 4) / 4  # on the grid: ties
        w = mx.array(w).astype(getattr(mx, dtype))
        packed, scales = mx.quantize(w, group_size=group, bits=bits, mode=mode)
        ours = quantize_float(np.array(w.astype(mx.float32)), mode, dtype)
        assert np.array_equal(ours[0], np.array(packed)), (scale, dtype)
        assert np.array_equal(ours[1].data, np.array(scales)), (scale, dtype)


def test_info_says_how_the_weights_are_quantized(quantized):
    import subprocess
    import sys

    run = [sys.executable, "-m", "mistral", "info", str(quantized)]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    n = sum(isinstance(t, QuantizedTensor) for t in read_checkpoint(quantized).tensors.values())
    assert f"quantized     {n} weights 4-bit affine, groups of 32" in out.stdout


def test_diff_holds_a_quantized_side_to_its_bits(tmp_path):
    """Full precision against its own 4-bit conversion agrees within the 4-bit tolerance; a
    layer whose scales were spoiled is named."""
    import dataclasses as dc
    import subprocess
    import sys

    from mistral.diff import load_side, precision_of, run_diff

    default = ROOT / "mistral" / "default_model"
    run = [sys.executable, "-m", "mistral", "convert", str(default), str(tmp_path / "q4"),
           "--to", "mlx", "--quantize", "4"]  # fmt: skip
    assert subprocess.run(run, capture_output=True, cwd=ROOT, check=False).returncode == 0
    full, q4 = read_checkpoint(default), read_checkpoint(tmp_path / "q4")
    tokens = Tokenizer(TOKENIZER).encode("And it came to pass, when the LORD had made an end")
    a = load_side("torch:cpu:float32", full)
    precisions = ("float32", precision_of(q4, "float32"))
    assert precisions[1] == "4-bit"
    report = run_diff(a, load_side("torch:cpu:float32", q4), tokens, precisions=precisions)
    assert report.agree, report.table()
    assert max(t.rel for t in report.taps) > 1e-2  # the 4-bit error is there, and allowed
    t = q4.tensors["layers.2.attention.wo.weight"]
    spoiled = dc.replace(t, scales=from_numpy(t.scales.to_numpy() * 8, t.scales.dtype))
    bad = dc.replace(q4, tensors={**q4.tensors, "layers.2.attention.wo.weight": spoiled})
    report = run_diff(a, load_side("torch:cpu:float32", bad), tokens, precisions=precisions)
    assert not report.agree and report.first_divergence == "layers.2.attention"


def test_the_mlx_lm_reference_holds_a_quantized_folder_as_mlx_lm_loads_it(quantized):
    """diff and bench --compare mlx-lm on a quantized folder: the reference quantizes its layers
    as mlx-lm's load does and agrees with mlx-lm's own model and with ours."""
    from mlx_lm import load

    from mistral.contract import reference

    ckpt = read_checkpoint(quantized)
    tokens = random_rows([20], BASE.vocab_size, 4)[0]
    ref = reference("mlx-lm", ckpt.args, ckpt.tensors, "cpu", "float32").trace(tokens)["logits"]
    theirs = mlx_lm_logits(load(str(quantized))[0], [tokens])[0]
    ours = mistral.load(quantized, backend="mlx", device="cpu", dtype="float32").logits([tokens])
    assert max_diff([ref], [theirs]) <= 1e-5 and max_diff([ref], ours) <= 1e-4


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64)])
def test_both_backends_match_mlx_lm_on_its_quantized_mixtral(tmp_path, bits, group):
    """mlx-lm stacks a Mixtral layer's experts (3-D codes, scales and biases, switch_mlp) and
    quantizes the gate too: split per expert on reading; MLX multiplies each expert's codes
    (its experts then loop, not gathered), torch dequantizes them."""
    moe = dataclasses.replace(tiny("tiny-moe"), vocab_size=2048)
    folder, theirs = mlx_lm_quantized(tmp_path, moe, bits, group)
    ckpt = read_checkpoint(folder)
    assert isinstance(ckpt.tensors["layers.0.feed_forward.experts.3.w1.weight"], QuantizedTensor)
    assert isinstance(ckpt.tensors["layers.0.feed_forward.gate.weight"], QuantizedTensor)
    rows = random_rows([16, 9], moe.vocab_size, 1)  # within the window: mlx-lm's has none
    expected = mlx_lm_logits(theirs, rows)
    for backend in ("torch", "mlx"):
        model = mistral.load(folder, backend=backend, device="cpu", dtype="float32")
        assert max_diff(model.logits(rows), expected) <= 1e-4, backend
        assert max_diff(model.logits(rows, chunk_size=7), expected) <= 1e-4, backend


@pytest.mark.parametrize("bits, group", [(8, 64)])  # w2's 96 inputs: left in full precision
def test_convert_quantize_of_a_mixtral_writes_what_mlx_lm_writes(tmp_path, bits, group):
    """A Mixtral's experts quantized stacked, as mlx-lm's switch_mlp (codes, scales and biases
    of shape (E, ...)), its gate too: tensor for tensor what mlx-lm's convert writes."""
    import subprocess
    import sys

    from mlx_lm.convert import convert

    from mistral.safetensors_file import read_tensors

    moe = dataclasses.replace(tiny("tiny-moe"), vocab_size=2048)
    src = hf_folder(tmp_path / "hf", moe)
    run = [sys.executable, "-m", "mistral", "convert", str(src), str(tmp_path / "ours"), "--to",
           "mlx", "--quantize", str(bits), "--group-size", str(group)]  # fmt: skip
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    convert(str(src), str(tmp_path / "theirs"), quantize=True, q_bits=bits, q_group_size=group)
    ours = read_tensors(tmp_path / "ours" / "model.safetensors")
    theirs = {}
    for f in (tmp_path / "theirs").glob("model*.safetensors"):
        theirs.update(read_tensors(f))
    assert set(ours) == set(theirs)
    assert "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.scales" in ours
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and np.array_equal(t.data, theirs[name].data), name
    rows = random_rows([16, 9], moe.vocab_size, 1)
    torch_logits = mistral.load(tmp_path / "ours", device="cpu", dtype="float32").logits(rows)
    mlx_logits = mistral.load(tmp_path / "ours", "mlx", "cpu", "float32").logits(rows)
    assert max_diff(torch_logits, mlx_logits) <= 1e-4


def test_the_compiled_decode_step_keeps_the_codes(quantized, monkeypatch):
    """--compile on mlx-lm's 4-bit folder: torch.compile of the decode step with the quantized
    layers in it, the output in 2 blocks of rows, the last ragged (inductor compiles the
    unpacking and dequantization of each block; on CUDA the step replays as a CUDA graph): one
    graph, no break; the codes stay codes, greedy tokens equal eager's, logits to float32
    rounding (the compiled dequantization may round code * scale + bias once where eager rounds
    twice)."""
    from backends.torch import quantized as layers

    monkeypatch.setattr(layers, "ELEMENTS_AT_ONCE", 1100 * BASE.dim)  # the output: 2 blocks
    eager = mistral.load(quantized, device="cpu", dtype="float32")
    compiled = mistral.load(quantized, device="cpu", dtype="float32", compile=True)
    wq = compiled.runner.model.layers[0].attention.wq
    assert type(wq).__name__ == "QuantizedLinear" and compiled.runner.decode_model is not None
    assert_compiled_agrees(eager, compiled, random_rows([10, 7], BASE.vocab_size, 10), 12)
