"""Hostile files and inputs, each written by the test itself: refused in one line, nothing read
from outside the folder, nothing allocated before sizes are checked, nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import mistral
from mistral import MistralError
from mistral.checkpoint import read_checkpoint, write_checkpoint
from mistral.npz_file import read_npz
from mistral.safetensors_file import read_tensors
from mistral.weights import random_weights
from tests.helpers import ROOT, run_cli, tiny


def safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def f32(shape, begin, end) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, 12, "overlaps"),
        ({"a": f32([2], 0, 8), "b": f32([1], 12, 16)}, 16, "gap"),
        ({"a": f32([2], -8, 0)}, 8, "corrupt header entry"),
        ({"a": f32([2], 0, 8)}, 12, "truncated or corrupt data"),  # bytes nobody names
        ({"a": f32([2], 0, 8)}, 4, "truncated or corrupt data"),
        ({"a": f32([10**9, 10**9], 0, 8)}, 8, "does not fit its shape"),  # no allocation
        ({"a": f32([2, "3"], 0, 8)}, 8, "corrupt header entry"),
        ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    ],
)
def test_safetensors_ranges_must_tile_the_data(tmp_path, header, data, message):
    safetensors(tmp_path / "x.safetensors", header, bytes(data))
    with pytest.raises(MistralError, match=message):
        read_tensors(tmp_path / "x.safetensors")


def test_safetensors_duplicate_names_and_deep_json(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(MistralError, match="duplicate key 'a'"):
        read_tensors(tmp_path / "d.safetensors")
    deep = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "n.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(MistralError, match="nested too deep"):
        read_tensors(tmp_path / "n.safetensors")


def test_only_regular_files_are_read(tmp_path):
    """A FIFO would block the reader forever."""
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    (tmp_path / "consolidated.safetensors").unlink()
    os.mkfifo(tmp_path / "consolidated.safetensors")
    with pytest.raises(MistralError, match="not a regular file"):
        read_checkpoint(tmp_path)
    (tmp_path / "consolidated.safetensors").unlink()
    os.mkfifo(tmp_path / "consolidated.00.pth")
    with pytest.raises(MistralError, match="not a regular file"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("key, value", [("norm_eps", "Infinity"), ("rope_theta", "NaN")])
def test_params_that_are_not_finite(tmp_path, key, value):
    params = {**tiny("tiny-dense").to_params(), key: "VALUE"}
    (tmp_path / "params.json").write_text(json.dumps(params).replace('"VALUE"', value))
    with pytest.raises(MistralError, match=f"{key} must be a positive number"):
        mistral.ModelArgs.from_file(tmp_path / "params.json")


def test_params_that_are_not_text_or_too_deep(tmp_path):
    (tmp_path / "params.json").write_bytes(b'{"dim": "\xff\xfe"}')
    with pytest.raises(MistralError, match="cannot read JSON"):
        mistral.ModelArgs.from_file(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MistralError, match="nested too deep"):
        mistral.ModelArgs.from_file(tmp_path / "params.json")


def test_a_config_claiming_a_billion_layers_is_refused_before_listing_them(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    params = {**args.to_params(), "n_layers": 10**9}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(MistralError, match="asks for 9,000,000,003 tensors"):
        mistral.load(tmp_path, device="cpu")


def test_npz_members_are_mapped_and_checked(tmp_path):
    args = tiny("tiny-dense")
    weights = {k: t.data for k, t in random_weights(args, dtype="float16").items()}
    np.savez(tmp_path / "w.npz", **weights)
    got = read_npz(tmp_path / "w.npz")
    t = got["norm.weight"]
    assert np.array_equal(t.data, weights["norm.weight"]) and t.dtype == "float16"
    base = t.data
    while not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    assert isinstance(base, np.memmap)  # mapped, not read
    np.savez_compressed(tmp_path / "c.npz", a=np.zeros(10**6, np.float32))  # a bomb, small
    with pytest.raises(MistralError, match="compressed"):
        read_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "o.npz", a=np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MistralError, match="unsupported dtype object"):
        read_npz(tmp_path / "o.npz")
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as zf:
        zf.writestr("a.npy", b"\x80\x04K\x01.")  # a raw pickle, not an .npy
    with pytest.raises(MistralError, match="unreadable npz"):
        read_npz(tmp_path / "p.npz")


def test_convert_refuses_unknown_tensors_and_leaves_nothing(tmp_path):
    args = tiny("tiny-dense")
    weights = random_weights(args)
    weights["layers.0.extra.weight"] = weights["norm.weight"]
    write_checkpoint(tmp_path / "src", "mistral", args, weights)
    out = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf")
    assert out.returncode == 1 and "unexpected: layers.0.extra.weight" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dst").exists()


def test_an_interrupted_conversion_leaves_no_folder_that_looks_whole(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path / "src", "mistral", args, random_weights(args))
    fail = (
        "import mistral.safetensors_file as s, mistral.checkpoint as c\n"
        "def broken(*a, **k):\n    raise OSError(28, 'No space left on device')\n"
        "c.write_tensors = broken\n"
    )
    out = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "dst"), code=fail)
    assert out.returncode == 1 and "No space left on device" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": float("nan")}, "temperature must be >= 0 and finite"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"max_tokens": 2.5}, "max_tokens must be >= 0"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"chunk_size": 1.5}, "chunk_size must be positive"),
    ],
)
def test_generation_options_are_checked(kwargs, message):
    args = tiny("tiny-dense")
    model = mistral.from_tensors(args, random_weights(args), device="cpu")
    options = {"max_tokens": 3, **kwargs}
    with pytest.raises(MistralError, match=message):
        model.generate([[1, 2, 3]], **options)


def test_a_batch_of_the_wrong_type_is_named():
    args = tiny("tiny-dense")
    model = mistral.from_tensors(args, random_weights(args), device="cpu")
    with pytest.raises(MistralError, match="the batch must be a list of rows"):
        model.generate(np.ones((2, 3), dtype=np.int64), 2)
    with pytest.raises(MistralError, match="row 0 is not a list"):
        model.logits([5])


def test_a_long_prompt_is_fed_in_windows(monkeypatch):
    """With a window in every layer, a prompt is fed a window at a time: its masks grow
    linearly with its length (one shot, a 45k-token prompt asked for a 2 GB mask)."""
    args = tiny("tiny-window")
    model = mistral.from_tensors(args, random_weights(args), device="cpu")
    seen = []
    forward = model.runner.forward

    def spy(tokens, plans, cache, last_only):
        seen.append(max(plan.mask.shape[1] * plan.mask.shape[2] for plan in plans.values()))
        return forward(tokens, plans, cache, last_only)

    monkeypatch.setattr(model.runner, "forward", spy)
    W = args.sliding_window
    model.generate([list(range(1, 10 * W))], 1)
    assert len(seen) == 10 and max(seen) <= W * 2 * W


def test_links_into_the_hugging_face_hub_cache_are_followed(tmp_path):
    """The hub cache keeps a snapshot's files as links to ../../blobs/: those load; a link to a
    file elsewhere does not."""
    args = dataclasses.replace(tiny("tiny-dense"), vocab_size=2048)  # the embedded tokenizer's
    write_checkpoint(tmp_path / "plain", "hf", args, random_weights(args))
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "plain").iterdir())):
        f.rename(repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    shutil.copy(ROOT / "mistral" / "default_model" / "tokenizer.model", repo / "blobs" / "tok")
    (snapshot / "tokenizer.model").symlink_to("../../blobs/tok")
    model = mistral.load(snapshot, device="cpu")
    assert model.tokenizer is not None and len(model.generate([[1, 2]], 2)[0]) == 2
    (tmp_path / "home.txt").write_text("private")
    (snapshot / "tokenizer.model").unlink()
    (snapshot / "tokenizer.model").symlink_to(tmp_path / "home.txt")
    with pytest.raises(MistralError, match="points outside the model folder"):
        mistral.load(snapshot, device="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0, "head_dim": None}, "malformed config"),
        ({"num_attention_heads": "4"}, "n_heads must be a positive integer"),
        ({"rope_scaling": "yarn"}, "malformed config"),
        ({"rope_theta": "abc"}, "malformed config"),
        ({"rope_theta": None}, "malformed config"),
    ],
)
def test_hugging_face_configs_that_make_no_sense(tmp_path, change, message):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "hf", args, random_weights(args))
    config = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MistralError, match=message) as e:
        read_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_a_moe_error_names_its_file(tmp_path):
    params = {**tiny("tiny-moe").to_params(), "moe": {"num_experts": 4}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(MistralError, match=r"params.json: moe: missing \['num_experts_per_tok'\]"):
        mistral.ModelArgs.from_file(tmp_path / "params.json")


def test_tokenizer_decode_outside_its_vocabulary_is_named():
    tok = mistral.Tokenizer(ROOT / "mistral" / "default_model" / "tokenizer.model")
    with pytest.raises(MistralError, match="token id 5000 is outside the tokenizer's 2048"):
        tok.decode([1, 5000])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diff", "--generate", "-3", "--tokens", "1,2"], "--generate must be >= 0"),
        (["bench", "--config", "tiny-dense", "--window", "0"], "sliding_window must be a positive"),
        (["bench", "--json", "/nonexistent/x.json"], "its folder does not exist"),
        (["diff", "--tokens", "1,2", "--plot", "/nonexistent/x.png"], "its folder does not exist"),
        (["generate", "--prompt", "x", "--temperature", "nan"], "temperature must be >= 0"),
        (["generate", "--prompt", "x", "--seed", "-1"], "seed must be an integer >= 0"),
        (
            ["generate", "--prompt", "x", "--fp8", "scaled"],
            "fp8 scaled is for FP8 weights, and it has none",
        ),
    ],
)
def test_command_line_refusals_are_one_line(argv, message):
    out = run_cli(*argv)
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_full_or_read_only_destination_is_one_line(tmp_path):
    """An OSError while writing (here: the JSON path is a folder) ends in one line, exit 1."""
    (tmp_path / "out.json").mkdir()
    out = run_cli(
        "bench",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "out.json"),
    )
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        "mistral bench: error: Is a directory"
    )


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("gib", [10_000, 10])  # more than any machine's memory; more than allowed
def test_a_cache_that_cannot_fit_is_refused_in_one_line(backend, gib):
    """Under an address-space limit of 6 GiB (the machine is never exhausted): a run whose cache
    would need ``gib`` GiB is refused before or at allocation, not killed."""
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
import mistral
from mistral.weights import cache_bytes, random_weights
from tests.helpers import tiny
args = tiny("tiny-dense")
model = mistral.from_tensors(args, random_weights(args), backend={backend!r}, device="cpu")
tokens = int({gib} * 2**30 / cache_bytes(args, 4, 1, 1))
try:
    model.generate([[1, 2, 3]], tokens)
except mistral.MistralError as e:
    print("refused:", e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused: ") and len(out.stdout.strip().splitlines()) == 1


def test_text_that_is_not_utf8_is_one_line():
    prompt = run_cli(
        "generate",
        "--max-tokens",
        "2",
        "--prompt",
        "x",
        code="import sys\nsys.argv[-1] = 'a\\udcff'",
    )
    assert prompt.returncode == 1 and "not valid UTF-8" in prompt.stderr
    stdin = subprocess.run(
        [sys.executable, "-m", "mistral", "generate", "--max-tokens", "2"],
        input=b"In the \xff\xfe beginning",
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    assert stdin.returncode == 1 and b"not valid UTF-8" in stdin.stderr
    assert len(stdin.stderr.strip().splitlines()) == 1
    chat = subprocess.run(
        [sys.executable, "-m", "mistral", "chat", "--max-tokens", "3"],
        input=b"\xff\xfe\nIn the beginning\n",
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    assert chat.returncode == 0 and b"not valid UTF-8; try again" in chat.stderr
    assert chat.stdout.strip()  # the next line was answered


def test_mlx_used_from_worker_threads_exits_cleanly():
    """Without waiting for MLX's streams at exit, about half of these runs aborted ("terminate
    called without an active exception") after printing correct results."""
    code = """
from concurrent.futures import ThreadPoolExecutor
import mistral
def work(i):
    return mistral.load(backend="mlx", device="cpu").logits([[1, 2, 3]])[0].shape
with ThreadPoolExecutor(2) as pool:
    print(list(pool.map(work, range(2))))
"""
    for _ in range(8):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
        )
        assert out.returncode == 0, out.stderr[-500:]
        assert out.stdout.strip() == "[(3, 2048), (3, 2048)]"


def test_links_in_a_circle_or_to_nothing_are_named(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    (tmp_path / "tokenizer.model").symlink_to(tmp_path / "tokenizer.model")
    with pytest.raises(MistralError, match="a symlink loop"):
        mistral.load(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.model").symlink_to(tmp_path / "gone")
    with pytest.raises(MistralError, match="a link to nothing"):
        mistral.load(tmp_path)


def test_an_index_must_name_files(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "hf", args, random_weights(args))
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": 1}}')
    with pytest.raises(MistralError, match="no weight_map of tensor names to files"):
        read_checkpoint(tmp_path)


def test_a_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [sys.executable, "-m", "mistral", "info", str(ROOT / "mistral" / "default_model")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert out.returncode == 1 and "No space left on device" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("shape", [[10**9, 0], [50, 64], [4, 16, 64]])
def test_hugging_face_q_rows_are_checked_before_they_are_reordered(tmp_path, shape):
    """An HF wq whose shape is not the config's (a [1e9, 0] entry holds no bytes but would
    reorder a billion rows; 50 rows do not split into 4 heads) is named in one line."""
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "hf", args, random_weights(args))
    tensors = read_tensors(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    size = int(np.prod(shape)) * 4
    items = {k: (list(t.shape), t.to_numpy().tobytes()) for k, t in tensors.items() if k != name}
    items[name] = (shape, bytes(size))
    header, data, offset = {}, b"", 0
    for k, (s, raw) in items.items():
        header[k] = f32(s, offset, offset + len(raw))
        data += raw
        offset += len(raw)
    safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(MistralError, match="the config needs"):
        read_checkpoint(tmp_path)


def test_info_refuses_a_billion_layers_in_one_line(tmp_path):
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    params = {**args.to_params(), "n_layers": 10**9}
    (tmp_path / "params.json").write_text(json.dumps(params))
    out = run_cli("info", str(tmp_path))
    assert out.returncode == 1 and "asks for" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("temperature", [1e-308, 5e-324])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    from mistral.sampling import sample

    logits = np.array([[0.5, 3.0, -1.0, 2.9]], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, temperature, 1.0, rng).tolist() == [1]


@pytest.mark.parametrize("command", [["info", str(ROOT / "mistral" / "default_model")], ["chat"]])
def test_a_closed_stdout_is_one_line(command):
    out = subprocess.run(
        [sys.executable, "-m", "mistral", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert out.returncode == 1 and "standard output is closed" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_running_out_of_memory_is_one_line(tmp_path):
    """A long prompt on a model without a window under an address-space limit: the first
    prefill's masks do not fit, and the error says so in one line (and what to pass)."""
    args = dataclasses.replace(tiny("tiny-dense"), vocab_size=2048)
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    shutil.copy(ROOT / "mistral" / "default_model" / "tokenizer.model", tmp_path)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    code = f"{limit}; import sys; from mistral.cli import main; sys.exit(main())"
    prompt = "and it came to pass " * 12_000  # ~48k tokens: a 2 GB boolean mask, and more
    out = subprocess.run(
        [sys.executable, "-c", code, "generate", "--model", str(tmp_path), "--max-tokens", "1"],
        input=prompt,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert out.returncode == 1, out.stderr[-800:]
    assert "out of memory" in out.stderr and "--chunk-size" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["params.json", "config.json"])
def test_a_config_that_links_in_a_circle_is_named(tmp_path, name):
    (tmp_path / name).symlink_to(tmp_path / name)
    with pytest.raises(MistralError, match="a symlink loop"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "layout, name",
    [
        ("mistral", "consolidated.safetensors"),
        ("hf", "model.safetensors"),
        ("mlx-examples", "weights.npz"),
    ],
)
def test_a_weights_file_may_not_link_out_of_the_folder(tmp_path, layout, name):
    """A weights file linked to one elsewhere (a safetensors file in the user's home) is refused,
    as the tokenizer and an index's shards are; the hub cache's blobs/ stay allowed."""
    args = tiny("tiny-dense")
    write_checkpoint(tmp_path / "m", layout, args, random_weights(args))
    (tmp_path / "m" / name).rename(tmp_path / name)
    (tmp_path / "m" / name).symlink_to(tmp_path / name)
    with pytest.raises(MistralError, match="points outside the model folder"):
        read_checkpoint(tmp_path / "m")


def latent_args() -> mistral.ModelArgs:
    """A tiny latent-attention model with DeepSeekMoE (mistral4's routing)."""
    return mistral.ModelArgs.from_params(
        {
            **tiny("tiny-dense").to_params(),
            "head_dim": 12,
            "q_lora_rank": 16,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
            "moe": {"num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1},
        }
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"qk_rope_head_dim": None}, "latent attention needs qk_rope_head_dim too"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim must be even"),
        ({"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer"),
        ({"moe": {"num_experts": 4, "num_experts_per_tok": 2, "num_expert_groups": 3}}, "dividing"),
        (
            {"moe": {"num_experts": 4, "num_experts_per_tok": 3, "num_expert_groups": 2}},
            "3 experts per token cannot come from 1 groups of 2",
        ),
        ({"moe": {"num_experts": 4, "num_experts_per_tok": 2, "scoring_func": "tanh"}}, "tanh"),
        (
            {"moe": {"num_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 99}},
            "first_k_dense_replace must be a count from 0 to",
        ),
        (
            {"yarn": {"factor": 4.0, "original_max_position_embeddings": 8, "mscale_all_dim": -1}},
            "mscale_all_dim must be a positive finite number",
        ),
    ],
)
def test_latent_params_that_make_no_sense(change, message):
    params = {**latent_args().to_params(), **change}
    with pytest.raises(MistralError, match=message) as e:
        mistral.ModelArgs.from_params({k: v for k, v in params.items() if v is not None})
    assert "\n" not in str(e.value)


def test_a_softmax_factor_without_latent_attention_is_refused():
    yarn = {"factor": 4.0, "original_max_position_embeddings": 8, "mscale_all_dim": 1.0}
    with pytest.raises(MistralError, match="applies to latent attention only"):
        mistral.ModelArgs.from_params({**tiny("tiny-dense").to_params(), "yarn": yarn})


V2 = {"model_type": "deepseek_v2", "rope_parameters": {"rope_type": "default"}}  # no partial RoPE


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_interleave": False}, "rope_interleave false"),
        ({"attention_bias": True}, "attention_bias is not supported"),
        ({**V2, "norm_topk_prob": True}, "norm_topk_prob with deepseek_v2"),
        ({**V2, "topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "not the RoPE",
        ),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "missing key"),
    ],
)
def test_latent_configs_that_make_no_sense(tmp_path, change, message):
    args = latent_args()
    write_checkpoint(tmp_path, "hf", args, random_weights(args))
    config = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MistralError, match=message) as e:
        read_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [[4, 33, 64], [3, 32, 64], [4, 32]])
def test_fused_experts_of_the_wrong_shape_are_named(tmp_path, shape):
    """mistral4's gate_up_proj (E, 2 hidden, dim): an odd row count, too few experts, or not
    stacked at all is named, never guessed at."""
    from mistral.safetensors_file import read_tensors, write_tensors
    from mistral.weights import RawTensor

    args = latent_args()
    write_checkpoint(tmp_path, "hf", args, random_weights(args))
    path = tmp_path / "model.safetensors"
    tensors = {k: RawTensor(t.dtype, np.array(t.data)) for k, t in read_tensors(path).items()}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name in tensors
    tensors[name] = RawTensor("float32", np.zeros(shape, np.float32))
    path.unlink()
    write_tensors(path, list(tensors.items()))
    with pytest.raises(MistralError, match=r"does not match the model|unexpected tensors") as e:
        mistral.load(tmp_path, device="cpu")
    assert "\n" not in str(e.value)


def test_a_quantized_wkv_b_is_dequantized_at_load_on_both_backends():
    """The absorbed decode reads wkv_b's weight itself: its codes (as mlx-lm's deepseek_v2
    folders hold them) are dequantized at load on both backends, which then agree."""
    import dataclasses

    from mistral.quant import Quantization, QuantizedTensor, quantize
    from mistral.weights import RawTensor

    args = dataclasses.replace(latent_args(), moe=None)
    tensors = random_weights(args)
    q = Quantization(4, 32)
    key = "layers.0.attention.wkv_b.weight"
    packed, scales, biases = quantize(tensors[key].to_numpy(), "float32", q)
    tensors[key] = QuantizedTensor(RawTensor("uint32", packed), scales, biases, q)
    logits = [mistral.from_tensors(args, tensors, b, "cpu", "float32").logits([[1, 2, 3]])
              for b in ("torch", "mlx")]  # fmt: skip
    assert np.abs(logits[0][0] - logits[1][0]).max() <= 1e-5


def test_float8_codes_without_a_quantization_block_are_refused(tmp_path):
    """e4m3 bytes read as numbers would be garbage: a folder that holds them without saying
    how they are scaled is refused in one line."""
    from mistral.safetensors_file import write_tensors
    from mistral.weights import RawTensor

    args = tiny("tiny-dense")
    tensors = random_weights(args)
    tensors["layers.0.attention.wq.weight"] = RawTensor(
        "float8_e4m3", np.zeros(tensors["layers.0.attention.wq.weight"].shape, np.uint8)
    )
    write_checkpoint(tmp_path, "mistral", args, random_weights(args))
    (tmp_path / "consolidated.safetensors").unlink()
    write_tensors(tmp_path / "consolidated.safetensors", list(tensors.items()))
    with pytest.raises(MistralError, match="float8_e4m3 codes, but the config declares") as e:
        read_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_transformers_types_that_would_route_otherwise_are_refused():
    """A DeepSeekMoE without latent attention has no transformers type (mixtral would route
    otherwise); nor do sigmoid scores grouped by their best expert, a latent model with a
    window, or mistral4 with two original contexts."""
    import dataclasses

    from mistral import hf_config

    dense = tiny("tiny-moe")
    shared = dataclasses.replace(dense, moe=dataclasses.replace(dense.moe, num_shared_experts=1))
    with pytest.raises(MistralError, match="mixtral routes as Mixtral does"):
        hf_config.config_from_args(shared, "float32")
    latent = latent_args()
    grouped = dataclasses.replace(
        latent.moe, scoring_func="sigmoid", num_expert_groups=2, group_scoring="max"
    )
    with pytest.raises(MistralError, match="best two experts"):
        hf_config.config_from_args(dataclasses.replace(latent, moe=grouped), "float32")
    with pytest.raises(MistralError, match="no sliding window"):
        hf_config.config_from_args(dataclasses.replace(latent, sliding_window=8), "float32")
    yarn = mistral.args.YarnArgs(4.0, 8)
    scaling = mistral.args.Llama4ScalingArgs(16, 0.1)
    two = dataclasses.replace(latent, yarn=yarn, llama_4_scaling=scaling)
    with pytest.raises(MistralError, match="one original_max_position_embeddings"):
        hf_config.config_from_args(two, "float32")


def test_a_latent_params_json_keeps_its_yarn_through_a_round_trip():
    """apply_scale is written for latent attention: read back, an absent one would mean
    transformers' conversion of Small 4 (mscale_all_dim 1, q/k unscaled)."""
    import dataclasses

    from mistral.rope import Rope, softmax_scale

    latent = dataclasses.replace(latent_args(), yarn=mistral.args.YarnArgs(4.0, 8))
    back = mistral.ModelArgs.from_params(latent.to_params())
    assert back == latent
    assert Rope.of(back).mscale == Rope.of(latent).mscale > 1
    assert softmax_scale(back, 12) == softmax_scale(latent, 12)
