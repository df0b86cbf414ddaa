"""Latent attention and DeepSeekMoE against transformers and mlx-lm: DeepSeek-V2 in the V2-Lite
shape (no query LoRA, the first layer dense, two shared experts, greedy routing, YaRN with
DeepSeek's mscale), Mistral Small 4 (query LoRA, YaRN with query scaling, one shared expert,
groups scored by their best two) and DeepSeek-V3 (a sigmoid router with its bias, grouped)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mistral
from mistral import contract, hf_latent
from mistral.checkpoint import read_checkpoint, write_checkpoint
from mistral.safetensors_file import read_tensors
from tests.helpers import hf_greedy, hf_logits, max_diff, random_rows, seeded

ORIGINAL = 8  # YaRN's original context: the rows and the generation run well past it

SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    rms_norm_eps=1e-6,
    max_position_embeddings=4 * 8,
)
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL
)

CASES = {
    # V2-Lite: queries straight from the hidden state, two shared experts, greedy top-k; YaRN
    # with mscale = mscale_all_dim (q and k unscaled, the softmax scaled)
    "deepseek_v2": dict(
        SHAPE,
        model_type="deepseek_v2",
        q_lora_rank=None,
        n_shared_experts=2,
        topk_method="greedy",
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
    ),
    # V2 with group-limited routing: groups scored by their best expert
    "deepseek_v2-groups": dict(
        SHAPE,
        model_type="deepseek_v2",
        q_lora_rank=None,
        n_shared_experts=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    # Small 4: query LoRA, YaRN as its conversion sets it, queries scaled every 8 positions
    "mistral4": dict(
        SHAPE,
        model_type="mistral4",
        q_lora_rank=24,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        rope_parameters=dict(
            YARN,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
            llama_4_scaling_beta=0.2,
            partial_rotary_factor=4 / 12,
        ),
        head_dim=12,
    ),
    # V3: sigmoid scores with a bias that picks the experts, groups by their best two
    "deepseek_v3": dict(
        SHAPE,
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
}


def hf_model_of(config: dict, seed: int = 0):
    """transformers' model of a config, float32, eager, weights and router biases seeded."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = getattr(transformers, hf_latent.CLASSES[config["model_type"]])  # mistral4: not in Auto
    model = seeded(cls(cfg), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a buffer, not a parameter: seeded() leaves it at zero
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF model, our folder read back from its save_pretrained)."""
    name = request.param
    model = hf_model_of(CASES[name])
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return name, model, read_checkpoint(folder)


def test_the_folder_reads_as_latent_attention_and_deepseek_moe(case):
    name, _, ckpt = case
    a, config = ckpt.args, CASES[name]
    assert a.mla and a.kv_lora_rank == 16 and a.q_lora_rank == config["q_lora_rank"]
    assert a.moe.num_shared_experts == config["n_shared_experts"]
    assert a.moe.first_k_dense_replace == 1 and a.moe.expert_hidden_dim == 32
    assert a.moe.scoring_func == ("sigmoid" if name == "deepseek_v3" else "softmax")
    assert (a.llama_4_scaling is not None) == (name == "mistral4")


@pytest.mark.parametrize("backend", contract.BACKENDS)
def test_logits_match_transformers(case, backend):
    """Ragged rows past YaRN's original context and the query scaling's periods, whole and in
    chunks (a chunk attends over cached latents)."""
    _, model, ckpt = case
    ours = mistral.from_tensors(ckpt.args, ckpt.tensors, backend, "cpu", "float32")
    rows = random_rows([5 * ORIGINAL + 3, 9, 3 * ORIGINAL], ckpt.args.vocab_size, 1)
    expected = hf_logits(model, rows)
    assert max_diff(ours.logits(rows), expected) <= 1e-4
    assert max_diff(ours.logits(rows, chunk_size=5), expected) <= 1e-4


@pytest.mark.parametrize("backend", contract.BACKENDS)
def test_greedy_generation_matches_transformers(case, backend):
    """Decode steps take the absorbed form; transformers expands keys and values every step."""
    _, model, ckpt = case
    ours = mistral.from_tensors(ckpt.args, ckpt.tensors, backend, "cpu", "float32")
    prompt = random_rows([7], ckpt.args.vocab_size, 2)[0]
    n = 4 * ORIGINAL
    assert ours.generate([prompt], max_tokens=n)[0] == hf_greedy(model, prompt, n)


@pytest.mark.parametrize("backend", contract.BACKENDS)
def test_the_absorbed_form_is_the_expanded_form(case, backend):
    """Decode's absorbed attention (wkv_b folded into the queries and the output) against the
    expanded one on the same queries, latents and mask, on every layer of the case."""
    _, _, ckpt = case
    model = mistral.from_tensors(ckpt.args, ckpt.tensors, backend, "cpu", "float32")
    rng = np.random.default_rng(3)
    a = ckpt.args
    B, T, K, H = 2, 3, 11, a.n_heads
    arrays = [
        rng.standard_normal((B, H, T, a.qk_nope_head_dim), dtype=np.float32),
        rng.standard_normal((B, H, T, a.qk_rope_head_dim), dtype=np.float32),
        rng.standard_normal((B, 1, K, a.kv_lora_rank), dtype=np.float32),
        rng.standard_normal((B, 1, K, a.qk_rope_head_dim), dtype=np.float32),
    ]
    mask = rng.random((B, 1, T, K)) < 0.7
    mask[..., 0] = True  # every query sees a key
    if backend == "torch":
        import torch

        inputs = [torch.from_numpy(x) for x in arrays] + [torch.from_numpy(mask)]
        to_numpy = lambda t: t.detach().numpy()  # noqa: E731
    else:
        import mlx.core as mx

        inputs = [mx.array(x) for x in arrays] + [mx.array(mask)]
        to_numpy = np.array
    for layer in model.runner.model.layers:
        attention = layer.attention
        expanded = to_numpy(attention.expanded(*inputs))
        absorbed = to_numpy(attention.absorbed(*inputs))
        assert expanded.shape == (B, H, T, a.v_head_dim)
        assert np.abs(expanded - absorbed).max() <= 1e-5


def mlx_lm_from_folder(folder):
    """mlx-lm's own model of a folder transformers saved. Its deepseek_v2 reads YaRN from
    rope_scaling (transformers 5 writes rope_parameters) and needs one: the config says both."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    config = json.loads((folder / "config.json").read_text())
    config.setdefault("rope_scaling", config.get("rope_parameters"))
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = mx.load(str(folder / "model.safetensors"))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["deepseek_v2", "mistral4", "deepseek_v3"])
def test_mlx_matches_mlx_lm(name, tmp_path):
    """mlx-lm's deepseek_v2, mistral4 and deepseek_v3 on the folder transformers saved, past
    YaRN's original context. (Its deepseek_v2 runs only with YaRN: the greedy-groups case, with
    plain RoPE, is compared with transformers alone.)"""
    from tests.helpers import mlx_lm_logits

    hf_model_of(CASES[name]).save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    ours = mistral.from_tensors(ckpt.args, ckpt.tensors, "mlx", "cpu", "float32")
    rows = random_rows([5 * ORIGINAL + 3, 9], ckpt.args.vocab_size, 5)
    assert max_diff(ours.logits(rows), mlx_lm_logits(mlx_lm_from_folder(tmp_path), rows)) <= 1e-4


def test_mistral_and_hugging_face_layouts_round_trip(case, tmp_path):
    """params.json keeps the latent keys and Mistral Small 4's names (experts beside attention);
    back in Hugging Face's layout, transformers loads the folder (mistral4's experts fused) and
    computes, bit for bit, what it computes from the folder it saved itself. (Not the in-memory
    model: its own save and load already move the logits by ~2e-7.)"""
    import transformers

    name, _, ckpt = case
    write_checkpoint(tmp_path / "m", "mistral", ckpt.args, ckpt.tensors)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["kv_lora_rank"] == 16 and params["moe"]["first_k_dense_replace"] == 1
    stored = read_tensors(tmp_path / "m" / "consolidated.safetensors")
    assert "layers.1.experts.0.w1.weight" in stored and "layers.1.gate.weight" in stored
    assert not any(".feed_forward.experts." in k for k in stored)
    back = read_checkpoint(tmp_path / "m")
    assert back.args == ckpt.args
    write_checkpoint(tmp_path / "h", "hf", back.args, back.tensors)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["model_type"] == CASES[name]["model_type"]
    again = read_checkpoint(tmp_path / "h")
    assert again.args == ckpt.args
    for key, t in ckpt.tensors.items():
        assert np.array_equal(again.tensors[key].data, t.data), key
    cls = getattr(transformers, hf_latent.CLASSES[config["model_type"]])
    ours = cls.from_pretrained(tmp_path / "h", attn_implementation="eager")
    theirs = cls.from_pretrained(ckpt.path, attn_implementation="eager")
    rows = random_rows([3 * ORIGINAL], ckpt.args.vocab_size, 6)
    assert max_diff(hf_logits(ours, rows), hf_logits(theirs, rows)) == 0.0


# mlx-lm's deepseek_v2 runs only with YaRN: the groups case is diffed with transformers alone
DIFFS = [(name, "hf:cpu:float32") for name in CASES]
DIFFS += [(name, "mlx-lm:cpu:float32") for name in CASES if name != "deepseek_v2-groups"]


@pytest.mark.parametrize("name, side", DIFFS)
def test_diff_lines_the_taps_up_with_the_references(name, side, tmp_path):
    """Every tap (the RoPE parts of q and k, attention, the router's logits and the experts it
    chose under groups and bias) of ours against transformers' and mlx-lm's own models, uncached
    and in six greedy steps (--generate)."""
    from mistral.diff import load_side, run_diff
    from mistral.taps import tap_names

    hf_model_of(CASES[name]).save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    tokens = random_rows([3 * ORIGINAL], ckpt.args.vocab_size, 7)[0]
    ours, theirs = load_side("torch:cpu:float32", ckpt), load_side(side, ckpt)
    report = run_diff(ours, theirs, tokens)
    assert [t.name for t in report.taps] == tap_names(ckpt.args)
    assert report.agree, report.table()
    assert run_diff(ours, theirs, tokens, generate=6).agree


def test_mlx_lm_deepseek_v2_without_yarn_is_refused_in_one_line(tmp_path):
    from mistral.diff import load_side

    hf_model_of(CASES["deepseek_v2-groups"]).save_pretrained(tmp_path)
    with pytest.raises(mistral.MistralError, match="runs only with YaRN"):
        load_side("mlx-lm:cpu:float32", read_checkpoint(tmp_path))


SHIPPED = {"deepseek-v2-lite": 15.7, "mistral-small-4": 119.0, "deepseek-v3": 671.0}
# bfloat16 cache bytes per token over the layers (README's table): Mistral 7B's keys and values,
# the latent families' latent and RoPE key
CACHE_BYTES = {"mistral-7b-v0.1": 131072, "deepseek-v2-lite": 31104, "mistral-small-4": 23040}
CACHE_BYTES |= {"deepseek-v3": 70272}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_shipped_latent_shapes(name):
    """Parameter counts as published, transformers' type of each, the bench's arithmetic."""
    from mistral import hf_config
    from mistral.args import ModelArgs
    from mistral.bench import decode_bytes, prefill_flops
    from mistral.checkpoint import CONFIGS
    from mistral.weights import expected_shapes, tensor_count

    args = ModelArgs.from_file(CONFIGS / f"{name}.json")
    shapes = expected_shapes(args)
    assert round(sum(int(np.prod(s)) for s in shapes.values()) / 1e9, 1) == SHIPPED[name]
    assert len(shapes) == tensor_count(args)
    kind = {"deepseek-v2-lite": "deepseek_v2", "mistral-small-4": "mistral4"}.get(name)
    assert hf_config.model_type(args) == (kind or "deepseek_v3")
    assert prefill_flops(args, 16, 1) > 0
    fake = {k: type("T", (), {"shape": s})() for k, s in shapes.items()}
    assert decode_bytes(args, fake, 2, 64, 1) > 0


def test_cache_bytes_per_token_as_the_readme_says():
    from mistral.args import ModelArgs
    from mistral.checkpoint import CONFIGS
    from mistral.cli.folders import cache_per_token

    for name, n in CACHE_BYTES.items():
        assert cache_per_token(ModelArgs.from_file(CONFIGS / f"{name}.json")) == n, name


def test_info_and_convert_on_a_latent_folder(case, tmp_path):
    """`mistral info` shows the latent shape, the routing and the cache per token; `convert`
    writes Mistral's layout and back."""
    from tests.test_cli import run

    name, model, ckpt = case
    out = run("info", str(ckpt.path))
    assert out.returncode == 0, out.stderr
    assert "latent (kv rank 16" in out.stdout and "first 1 layer(s) dense" in out.stdout
    assert "120 bytes per token in bfloat16 over the layers (Mistral 7B: 128 KiB)" in out.stdout
    routing = {"deepseek_v2": "unnormalized", "deepseek_v3": "sigmoid scores", "mistral4": "top2"}
    assert routing.get(name, "by max") in out.stdout
    assert run("convert", str(ckpt.path), str(tmp_path / "m"), "--to", "mistral").returncode == 0
    assert run("convert", str(tmp_path / "m"), str(tmp_path / "h"), "--to", "hf").returncode == 0
    back = mistral.load(tmp_path / "h", device="cpu", dtype="float32")
    rows = random_rows([3 * ORIGINAL], back.args.vocab_size, 8)
    assert max_diff(back.logits(rows), hf_logits(model, rows)) <= 1e-4


# A latent shape whose every input dimension groups by 32, so that mlx-lm quantizes every layer
QUANTIZABLE = dict(dim=128, head_dim=48, hidden_dim=128, n_heads=4, n_kv_heads=4, q_lora_rank=64,
                   kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                   v_head_dim=32)  # fmt: skip


def quantizable(kind: str) -> mistral.ModelArgs:
    """tiny-latent in QUANTIZABLE's shape, routed as transformers' type ``kind`` routes."""
    import dataclasses

    from tests.helpers import tiny

    base = tiny("tiny-latent")
    moe = dataclasses.replace(base.moe, expert_hidden_dim=64, norm_topk_prob=kind != "deepseek_v2")
    moe.group_scoring = "max" if kind == "deepseek_v2" else "top2"
    moe.scoring_func = "sigmoid" if kind == "deepseek_v3" else "softmax"
    shape = dict(QUANTIZABLE, q_lora_rank=None if kind == "deepseek_v2" else 64)
    scaling = base.llama_4_scaling if kind == "mistral4" else None
    return dataclasses.replace(base, **shape, moe=moe, llama_4_scaling=scaling)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kind", hf_latent.TYPES)
def test_mlx_lm_s_converted_folders_load_on_both_backends(tmp_path, kind, quantize):
    """What mlx-lm's convert writes of each type, in float32 and at 4 bits: deepseek_v3's and
    mistral4's kv_b_proj as the halves embed_q and unembed_out (codes per head, joined back),
    deepseek_v2's as it is (its codes dequantized at load, as the absorbed decode reads it), the
    experts stacked as switch_mlp. Both backends give mlx-lm's logits."""
    from mlx_lm import load
    from mlx_lm.convert import convert

    from tests.helpers import mlx_lm_logits
    from tests.test_quantized import hf_folder

    args = quantizable(kind)
    src = hf_folder(tmp_path / "hf", args)
    config = json.loads((src / "config.json").read_text())
    assert config["model_type"] == kind
    config["rope_scaling"] = config["rope_parameters"]  # where mlx-lm's deepseek types read YaRN
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "mlx"
    convert(str(src), str(out), quantize=quantize, q_bits=4, q_group_size=32, dtype="float32")
    names = set(read_tensors(out / "model.safetensors"))
    halves = "model.layers.0.self_attn.embed_q.weight" in names
    assert (
        halves == (kind != "deepseek_v2")
        and "model.layers.1.mlp.switch_mlp.up_proj.weight" in names
    )
    rows = random_rows([5 * ORIGINAL + 3, 9], args.vocab_size, 5)
    expected = mlx_lm_logits(load(str(out))[0], rows)
    for backend in contract.BACKENDS:
        ours = mistral.load(out, backend=backend, device="cpu", dtype="float32")
        assert max_diff(ours.logits(rows), expected) <= 1e-4, backend


@pytest.mark.parametrize("kind", hf_latent.TYPES)
def test_convert_quantize_of_latent_attention_writes_what_mlx_lm_writes(tmp_path, kind):
    """--to mlx --quantize of each type, tensor for tensor what mlx-lm's convert writes: the
    experts stacked (switch_mlp), deepseek_v3's and mistral4's kv_b_proj as its per-head halves
    quantized along their last axis, DeepSeek's gate left whole (mistral4's quantized); mlx-lm
    and both backends then give the same logits."""
    from mlx_lm import load
    from mlx_lm.convert import convert

    from mistral.quant import Quantization
    from tests.helpers import mlx_lm_logits
    from tests.test_quantized import hf_folder

    src = hf_folder(tmp_path / "hf", quantizable(kind))
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"]  # where mlx-lm's deepseek types read YaRN
    (src / "config.json").write_text(json.dumps(config))
    ckpt = read_checkpoint(src)
    ours = tmp_path / "ours"
    write_checkpoint(ours, "mlx", ckpt.args, ckpt.tensors, quantize=Quantization(4, 32))
    for f in src.glob("tokenizer*.json"):  # which mlx_lm.load needs
        (ours / f.name).write_bytes(f.read_bytes())
    convert(str(src), str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=32)
    written = read_tensors(ours / "model.safetensors")
    theirs = read_tensors(tmp_path / "theirs" / "model.safetensors")
    assert set(written) == set(theirs)
    assert ("model.layers.1.mlp.gate.scales" in written) == (kind == "mistral4")
    for name, t in written.items():
        assert t.dtype == theirs[name].dtype and np.array_equal(t.data, theirs[name].data), name
    rows = random_rows([5 * ORIGINAL + 3, 9], ckpt.args.vocab_size, 5)
    expected = mlx_lm_logits(load(str(tmp_path / "theirs"))[0], rows)
    assert max_diff(mlx_lm_logits(load(str(ours))[0], rows), expected) == 0
    for backend in contract.BACKENDS:
        model = mistral.load(ours, backend=backend, device="cpu", dtype="float32")
        assert max_diff(model.logits(rows), expected) <= 1e-4, backend
