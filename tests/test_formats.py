"""Checkpoint layouts: what transformers and mlx-lm write, conversions, and bad files refused."""

import json
import pickle
import tracemalloc

import numpy as np
import pytest

import mistral
from mistral import MistralError, checkpoint
from mistral.checkpoint import read_checkpoint, write_checkpoint
from mistral.safetensors_file import read_tensors
from mistral.weights import RawTensor, random_weights
from tests.helpers import (
    hf_logits,
    hf_model,
    max_diff,
    mlx_lm_logits,
    mlx_lm_model,
    random_rows,
    save_hf,
    tiny,
)


def bits(t) -> np.ndarray:
    return np.ascontiguousarray(t.data).reshape(t.shape).view(np.uint8)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(bits(a[k]), bits(b[k])), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("config", ["tiny-window", "tiny-moe", "tiny-latent"])
def test_round_trips_through_every_layout_are_bit_exact(tmp_path, config, dtype):
    args = tiny(config)
    weights = random_weights(args, seed=4, dtype=dtype)
    write_checkpoint(tmp_path / "mistral", "mistral", args, weights)
    src = read_checkpoint(tmp_path / "mistral")
    for i, fmt in enumerate(["hf", "mlx", "mlx-examples", "mistral", "hf", "mistral"]):
        write_checkpoint(tmp_path / f"{i}", fmt, src.args, src.tensors)
        src = read_checkpoint(tmp_path / f"{i}")
        assert src.format == {"mlx": "hf"}.get(fmt, fmt) and src.args == args  # mlx-lm reads HF's
        assert_same_tensors(src.tensors, weights)


def test_cast_on_conversion(tmp_path):
    args = tiny("tiny-dense")
    weights = random_weights(args, seed=5)
    write_checkpoint(tmp_path / "a", "hf", args, weights, dtype="bfloat16")
    got = read_checkpoint(tmp_path / "a").tensors
    assert {t.dtype for t in got.values()} == {"bfloat16"}
    for k, t in got.items():
        np.testing.assert_allclose(t.to_numpy(), weights[k].to_numpy(), rtol=2**-8)


def test_hf_sharded_folder(tmp_path, monkeypatch):
    args = tiny("tiny-dense")
    weights = random_weights(args, seed=6)
    monkeypatch.setattr(checkpoint, "HF_SHARD_BYTES", 40_000)
    write_checkpoint(tmp_path, "hf", args, weights)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_tensors(read_checkpoint(tmp_path).tensors, weights)


@pytest.mark.parametrize("config", ["tiny-window", "tiny-moe"])
def test_folder_written_by_transformers_gives_its_logits(tmp_path, config):
    args = tiny(config)
    ref = hf_model(args, seed=7)
    save_hf(ref, tmp_path)
    ours = mistral.load(tmp_path, device="cpu", dtype="float32")
    assert read_checkpoint(tmp_path).format == "hf"
    rows = random_rows([40, 9], args.vocab_size, 0)
    assert max_diff(ours.logits(rows), hf_logits(ref, rows)) <= 1e-4


@pytest.mark.parametrize("config", ["tiny-dense", "tiny-moe"])
def test_folder_written_by_mlx_lm_gives_its_logits(tmp_path, config):
    from mlx_lm.utils import save_config, save_model

    from mistral import hf_config

    args = tiny(config)
    weights = random_weights(args, seed=8)
    ref = mlx_lm_model(args, weights)  # Mixtral's experts are stacked as switch_mlp
    save_model(tmp_path, ref)
    save_config(hf_config.config_from_args(args, "float32"), tmp_path / "config.json")
    ours = mistral.load(tmp_path, backend="mlx", device="cpu", dtype="float32")
    rows = random_rows([args.sliding_window or 30], args.vocab_size, 1)
    diff = float(np.abs(ours.logits(rows)[0] - mlx_lm_logits(ref, rows)[0]).max())
    assert diff <= 1e-4


def test_mlx_example_layout_with_npz_and_config_json(tmp_path):
    args = tiny("tiny-dense")
    weights = random_weights(args, seed=9, dtype="float16")
    np.savez(tmp_path / "weights.npz", **{k: t.data.reshape(t.shape) for k, t in weights.items()})
    (tmp_path / "config.json").write_text(
        json.dumps(mistral.hf_config.config_from_args(args, "float16"))
    )
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.format == "mlx-examples" and ckpt.args == args
    assert_same_tensors(ckpt.tensors, weights)


def test_conversion_streams_one_tensor_at_a_time(tmp_path):
    args = mistral.ModelArgs(
        dim=64,
        n_layers=8,
        head_dim=16,
        hidden_dim=96,
        n_heads=4,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=32,
        moe=mistral.MoeArgs(4, 2),
    )
    write_checkpoint(tmp_path / "src", "mistral", args, random_weights(args, 1, "bfloat16"))
    src = read_checkpoint(tmp_path / "src")
    largest = max(t.nbytes for t in src.tensors.values()) * 2  # as float32
    total = sum(t.nbytes for t in src.tensors.values()) * 2
    tracemalloc.start()
    write_checkpoint(tmp_path / "dst", "hf", src.args, src.tensors, dtype="float32")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 20 * largest
    assert peak < 4 * largest + 200_000, (peak, largest, total)


def test_unknown_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MistralError, match="no known checkpoint format"):
        read_checkpoint(tmp_path)
    with pytest.raises(MistralError, match="not a model folder"):
        read_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors_are_refused(tmp_path, damage):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    f = tmp_path / "consolidated.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(b"")
    with pytest.raises(MistralError, match=r"(truncated|corrupt)"):
        read_tensors(f)


class Exploit:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pth_with_code_is_refused_and_the_code_never_runs(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    (tmp_path / "consolidated.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(tmp_path / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": Exploit(marker)}, f)
    with pytest.raises(MistralError, match="not a plain tensor checkpoint"):
        mistral.load(tmp_path, device="cpu")
    assert not marker.exists()


def test_pth_holding_something_else_than_tensors(tmp_path):
    import torch

    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    (tmp_path / "consolidated.safetensors").unlink()
    torch.save({"tok_embeddings.weight": [1, 2, 3]}, tmp_path / "consolidated.00.pth")
    with pytest.raises(MistralError, match="is a list, not a tensor"):
        mistral.load(tmp_path, device="cpu")


def test_unknown_backend_and_dtype_are_named(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    with pytest.raises(MistralError, match="unknown backend 'jax'"):
        mistral.load(tmp_path, backend="jax")
    with pytest.raises(MistralError, match="unknown dtype 'int8'"):
        mistral.load(tmp_path, device="cpu", dtype="int8")
    with pytest.raises(MistralError, match="'cuda' is not available"):
        mistral.load(tmp_path, device="cuda")


def test_scales_without_a_quantization_block_are_refused(tmp_path):
    """Quantized folders load (tests/test_quantized.py) when their config says how; a .scales
    tensor in a folder whose config has no quantization block is refused, named."""
    args = tiny("tiny-dense")
    weights = mistral.hf.tensors_to_hf(args, random_weights(args))
    weights["model.layers.0.self_attn.q_proj.scales"] = weights["model.norm.weight"]
    write_checkpoint(tmp_path / "x", "mistral", args, random_weights(args))
    from mistral.safetensors_file import write_tensors

    (tmp_path / "q").mkdir()
    write_tensors(tmp_path / "q" / "model.safetensors", list(weights.items()))
    (tmp_path / "q" / "config.json").write_text(
        json.dumps(mistral.hf_config.config_from_args(args, "f"))
    )
    with pytest.raises(
        MistralError, match=r"q_proj\.scales but the config has no quantization block"
    ):
        read_checkpoint(tmp_path / "q")


def test_permutation_is_lazy_and_cancels_out():
    t = RawTensor("float32", np.arange(32, dtype=np.float32).reshape(8, 4))
    from mistral.hf import permute_rows

    p = permute_rows(t, 2, to_hf=True)
    assert p.source is t.source and p.data.shape == t.shape  # rows gathered only when asked
    assert np.array_equal(p.data[:, 0], [0, 8, 4, 12, 16, 24, 20, 28])  # per head: evens, odds
    back = permute_rows(p, 2, to_hf=False)
    assert back.rows is None and back.data is t.source  # a plain view again


def test_a_dtype_the_device_cannot_run_is_refused(tmp_path, monkeypatch):
    import torch

    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))

    def no_half(x, w, *rest):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.raises(MistralError, match=r"dtype float16 cannot run on cpu \(.addmm_impl_cpu_"):
        mistral.load(tmp_path, device="cpu", dtype="float16")


def test_mlx_backend_reads_safetensors_and_pth_without_torch(tmp_path):
    """A Mac without torch: safetensors and a torch.save'd .pth both load through MLX (our numpy
    readers), with the same logits; a damaged .pth is refused in one line."""
    import subprocess
    import sys

    import torch

    args = tiny("tiny-dense")
    weights = random_weights(args, dtype="bfloat16")
    write_checkpoint(tmp_path / "st", "mistral", args, weights)
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "params.json").write_text((tmp_path / "st" / "params.json").read_text())
    state = {
        k: torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16)
        for k, t in weights.items()
    }
    torch.save(state, tmp_path / "pth" / "consolidated.00.pth")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "params.json").write_text((tmp_path / "st" / "params.json").read_text())
    (tmp_path / "bad" / "consolidated.00.pth").write_bytes(b"not read")
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
import mistral
a = mistral.load({str(tmp_path / "st")!r}, backend="mlx", device="cpu").logits([[1, 2, 3]])[0]
b = mistral.load({str(tmp_path / "pth")!r}, backend="mlx", device="cpu").logits([[1, 2, 3]])[0]
print(a.shape, np.array_equal(a, b))
try:
    mistral.load({str(tmp_path / "bad")!r}, backend="mlx", device="cpu")
except mistral.MistralError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "(3, 256) True" in out.stdout
    assert "not a plain tensor checkpoint" in out.stdout


def test_files_a_folder_names_stay_inside_it(tmp_path):
    """A tokenizer linked to a file elsewhere, or an index naming a shard outside, is refused."""
    args = tiny("tiny-dense")
    outside = tmp_path / "secret.txt"
    outside.write_text("private")
    write_checkpoint(tmp_path / "m", "mistral", args, random_weights(args))
    (tmp_path / "m" / "tokenizer.model").symlink_to(outside)
    with pytest.raises(MistralError, match="points outside the model folder"):
        mistral.load(tmp_path / "m")
    write_checkpoint(tmp_path / "h", "hf", args, random_weights(args))
    (tmp_path / "h" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}
    (tmp_path / "h" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MistralError, match="points outside the model folder"):
        read_checkpoint(tmp_path / "h")


def memmapped(a: np.ndarray) -> bool:
    while not isinstance(a, np.memmap) and a.base is not None:
        a = a.base
    return isinstance(a, np.memmap)


@pytest.mark.parametrize(
    "dtype, name",
    [("float32", "weights.npz"), ("float16", "weights.npz"), ("bfloat16", "weights.safetensors")],
)
def test_mlx_output_files_and_every_reader_maps_the_file(tmp_path, dtype, name):
    """README: mlx-examples output is weights.npz, or weights.safetensors for bfloat16 (mlx output
    is Hugging Face's layout); every layout is read memory-mapped (nothing the size of the
    weights is read at load)."""
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path / "m", "mlx-examples", args, random_weights(args, dtype=dtype))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["params.json", name]
    write_checkpoint(tmp_path / "x", "mlx", args, random_weights(args, dtype=dtype))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    for fmt in ("mlx-examples", "mistral", "hf"):
        if fmt != "mlx-examples":
            write_checkpoint(tmp_path / fmt, fmt, args, random_weights(args, dtype=dtype))
        ckpt = read_checkpoint(tmp_path / ("m" if fmt == "mlx-examples" else fmt))
        assert all(memmapped(t.source) for t in ckpt.tensors.values()), fmt
