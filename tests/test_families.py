"""The newer Mistral families against transformers and mlx-lm: Ministral 8B (full and sliding
layers interleaved), Ministral 3 (YaRN, query scaling by position, tied embeddings), head_dim other
than dim / n_heads (Nemo, Small 3.x), and a mistral3 vision-language folder's text decoder."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

import mistral
from mistral import contract, hf, hf_config
from mistral.args import Llama4ScalingArgs, ModelArgs, YarnArgs
from mistral.checkpoint import read_checkpoint, write_checkpoint
from tests.helpers import hf_greedy, hf_logits, max_diff, random_rows, seeded

BASE = dict(
    dim=64,
    n_layers=4,
    head_dim=16,
    hidden_dim=128,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=256,
    rope_theta=10000.0,
)
W = 12  # the sliding window of the windowed cases

CASES = {
    # Ministral 8B: sliding and full layers interleaved (transformers' ministral, layer_types)
    "ministral": ModelArgs(**BASE, sliding_window=[W, None]),
    # Ministral 3: YaRN, queries scaled past every 8 positions, tied embeddings (the 3B)
    "ministral3": ModelArgs(
        **BASE,
        yarn=YarnArgs(factor=4.0, original_max_position_embeddings=8, apply_scale=False),
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=8, beta=0.3),
        tied_embeddings=True,
    ),
    # YaRN with its magnitude scale (apply_scale), untied
    "ministral3-scaled": ModelArgs(
        **BASE,
        yarn=YarnArgs(factor=8.0, original_max_position_embeddings=16, beta=16.0, alpha=2.0),
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=16, beta=0.1),
    ),
    # Nemo / Small 3.x: head_dim 24 != 64 / 4
    "mistral-head-dim": ModelArgs(**{**BASE, "head_dim": 24}, sliding_window=W),
}


def hf_model_of(args: ModelArgs, seed: int = 0):
    """transformers' own model of the type these args need, seeded, float32, eager attention."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config.config_from_args(args, "float32"))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return seeded(transformers.AutoModelForCausalLM.from_config(config), seed)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF model, our folder read back from its save_pretrained)."""
    name = request.param
    model = hf_model_of(CASES[name])
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return name, model, read_checkpoint(folder)


def test_the_folder_reads_back_as_the_args(case):
    name, _, ckpt = case
    assert ckpt.args == CASES[name]
    assert json.loads((ckpt.path / "config.json").read_text())[
        "model_type"
    ] == hf_config.model_type(CASES[name])


@pytest.mark.parametrize("backend", contract.BACKENDS)
def test_logits_match_transformers(case, backend):
    """Ragged rows past the window and past the query scaling's periods, whole and chunked."""
    _, model, ckpt = case
    ours = mistral.from_tensors(ckpt.args, ckpt.tensors, backend, "cpu", "float32")
    rows = random_rows([3 * W + 5, 9, 2 * W], ckpt.args.vocab_size, 1)
    expected = hf_logits(model, rows)
    assert max_diff(ours.logits(rows), expected) <= 1e-4
    assert max_diff(ours.logits(rows, chunk_size=5), expected) <= 1e-4


@pytest.mark.parametrize("backend", contract.BACKENDS)
def test_greedy_generation_matches_transformers_past_the_window(case, backend):
    _, model, ckpt = case
    ours = mistral.from_tensors(ckpt.args, ckpt.tensors, backend, "cpu", "float32")
    prompt = random_rows([7], ckpt.args.vocab_size, 2)[0]
    n = 3 * W
    assert ours.generate([prompt], max_tokens=n)[0] == hf_greedy(model, prompt, n)


def test_the_newer_keys_round_trip_through_params_json(case, tmp_path):
    """Mistral's own layout keeps them (yarn, llama_4_scaling, tied_embeddings, a window list)
    and back to Hugging Face's the folder holds the same tensors."""
    name, _, ckpt = case
    write_checkpoint(tmp_path / "m", "mistral", ckpt.args, ckpt.tensors)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    back = read_checkpoint(tmp_path / "m")
    assert back.args == ckpt.args
    assert ("output.weight" in back.tensors) == (not ckpt.args.tied_embeddings)
    if name == "ministral":
        assert params["sliding_window"] == [W, None]
    if name == "ministral3":
        assert params["tied_embeddings"] is True
        assert params["yarn"]["apply_scale"] is False
        assert params["llama_4_scaling"] == {"original_max_position_embeddings": 8, "beta": 0.3}
    write_checkpoint(tmp_path / "h", "hf", back.args, back.tensors)
    again = read_checkpoint(tmp_path / "h")
    assert again.args == ckpt.args
    for key, t in ckpt.tensors.items():
        assert np.array_equal(again.tensors[key].data, t.data), key


def test_tied_embeddings_share_one_table():
    args = CASES["ministral3"]
    tensors = mistral.weights.random_weights(args)
    assert "output.weight" not in tensors
    torch_model = mistral.from_tensors(args, tensors, "torch", "cpu").runner.model
    assert torch_model.output.weight.data_ptr() == torch_model.tok_embeddings.weight.data_ptr()
    mlx_model = mistral.from_tensors(args, tensors, "mlx", "cpu").runner.model
    assert mlx_model.output.weight is mlx_model.tok_embeddings.weight


def test_memory_past_the_window_grows_only_with_the_full_layers():
    """Ministral's interleaved layers: sliding layers keep W slots, full layers every token."""
    args = CASES["ministral"]
    for backend in contract.BACKENDS:
        model = mistral.from_tensors(args, mistral.weights.random_weights(args), backend, "cpu")
        session = model.session(batch=1, context=10 * W)
        sizes = sorted(c.k.shape[2] for c in session.cache)
        assert sizes == [W, W, 10 * W, 10 * W], backend


def mistral3_folder(tmp_path, text: ModelArgs):
    """A Mistral3ForConditionalGeneration (a tiny Pixtral tower in front of the decoder) saved by
    transformers, and the model."""
    import torch
    import transformers

    text_config = hf_config.config_from_args(text, "float32")
    vision = transformers.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=8,
    )
    config = transformers.Mistral3Config(
        text_config=text_config,
        vision_config=vision.to_dict(),
        tie_word_embeddings=text.tied_embeddings,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = seeded(transformers.Mistral3ForConditionalGeneration(config))
    model.save_pretrained(tmp_path)
    return model


def runtime_names(folder) -> None:
    """Renames a saved mistral3 folder's tensors as transformers 5 names them at run time
    (model.language_model.*, model.vision_tower.*, lm_head), which other tools write."""
    from mistral.safetensors_file import read_tensors, write_tensors

    renames = [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    path = folder / "model.safetensors"
    tensors = read_tensors(path)
    renamed = {}
    for name, t in tensors.items():
        old, new = next(r for r in renames if name.startswith(r[0]))
        renamed[new + name.removeprefix(old)] = t
    items = [(k, type(t)(t.dtype, np.array(t.source))) for k, t in renamed.items()]
    path.unlink()
    write_tensors(path, items, None, None)


@pytest.mark.parametrize("names", ["saved", "runtime"])
@pytest.mark.parametrize("text", ["mistral-head-dim", "ministral3"])
def test_a_mistral3_folder_loads_its_text_decoder(tmp_path, text, names):
    """Small 3.x and Ministral 3 ship as mistral3 folders: the decoder loads (under either
    naming), in one line it says images are not supported, and its logits are transformers' for
    text alone."""
    model = mistral3_folder(tmp_path, CASES[text])
    if names == "runtime":
        runtime_names(tmp_path)
    assert any("vision_tower." in k for k in _saved_names(tmp_path))
    rows = random_rows([2 * W + 3], CASES[text].vocab_size, 3)
    expected = hf_logits(model, rows)
    for backend in contract.BACKENDS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = mistral.load(tmp_path, backend=backend, device="cpu", dtype="float32")
        assert any("images are not supported" in str(w.message) for w in caught)
        assert ours.args == CASES[text]
        assert max_diff(ours.logits(rows), expected) <= 1e-4, backend


def _saved_names(folder) -> set[str]:
    from mistral.safetensors_file import read_tensors

    return set(read_tensors(folder / "model.safetensors"))


def mlx_lm_of(args: ModelArgs, tensors: dict):
    """mlx-lm's own model from the config.json and tensors we would write for transformers."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    config = hf_config.config_from_args(args, "float32")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {k: mx.array(t.to_numpy()) for k, t in hf.tensors_to_hf(args, tensors).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["ministral3", "ministral3-scaled", "mistral-head-dim"])
def test_mlx_matches_mlx_lm(name):
    """mlx-lm runs ministral3 (YaRN, query scaling, tying) and mistral with its own head_dim;
    mistral goes through its llama, which windows no layer not listed in layer_types, so that
    case stays within the window. mlx-lm has no ministral model type: not compared."""
    from tests.helpers import mlx_lm_logits

    args = CASES[name]
    tensors = mistral.weights.random_weights(args, seed=4)
    ours = mistral.from_tensors(args, tensors, "mlx", "cpu", "float32")
    theirs = mlx_lm_of(args, tensors)
    longest = W if args.sliding_window else 3 * W + 5
    rows = random_rows([longest, 9], args.vocab_size, 5)
    assert max_diff(ours.logits(rows), mlx_lm_logits(theirs, rows)) <= 1e-4


def test_what_transformers_cannot_hold_is_refused_in_one_line():
    args = CASES["ministral"]
    two = dataclasses.replace(args, sliding_window=[W, 2 * W])
    with pytest.raises(mistral.MistralError, match="one sliding window"):
        hf_config.config_from_args(two, "float32")
    mixed = dataclasses.replace(CASES["ministral3"], sliding_window=[W, None])
    with pytest.raises(mistral.MistralError, match="no per-layer windows"):
        hf_config.config_from_args(mixed, "float32")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sliding_window": [W, None, W]}, "does not divide n_layers"),
        ({"sliding_window": []}, "sliding_window must be"),
        ({"sliding_window": [W, 0]}, "sliding_window must be"),
        ({"yarn": {"factor": 4.0}}, "missing"),
        ({"yarn": {"factor": -1.0, "original_max_position_embeddings": 8}}, "yarn.factor"),
        ({"yarn": {"factor": 2, "original_max_position_embeddings": 8, "beta": "x"}}, "yarn.beta"),
        ({"yarn": {"factor": 2, "original_max_position_embeddings": 8, "gamma": 1}}, "unknown"),
        ({"llama_4_scaling": {"original_max_position_embeddings": 0, "beta": 0.1}}, "positive"),
        ({"llama_4_scaling": {"original_max_position_embeddings": 8, "beta": 1e999}}, "finite"),
        ({"tied_embeddings": "yes"}, "tied_embeddings"),
    ],
)
def test_bad_newer_params_are_one_line(change, message):
    with pytest.raises(mistral.MistralError, match=message):
        ModelArgs.from_params({**BASE, **change})


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "longrope"}, "not supported"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
          "attention_factor": 0.5}, "attention factor"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
          "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("yarn", "must be an object"),
    ],
)  # fmt: skip
def test_hugging_face_rope_we_cannot_run_is_refused(rope, message):
    config = hf_config.config_from_args(CASES["ministral3"], "float32")
    config["rope_parameters"] = rope
    with pytest.raises(mistral.MistralError, match=message):
        hf_config.args_from_config(config)


def test_params_with_a_vision_encoder_load_the_text_decoder(tmp_path):
    """Mistral's own layout of a vision-language model: params.json names a vision_encoder and
    the file holds its tensors beside the decoder's; the decoder is read, and it says so."""
    from mistral.safetensors_file import write_tensors
    from mistral.weights import from_numpy, random_weights

    args = CASES["mistral-head-dim"]
    tensors = random_weights(args)
    tower = {
        "vision_encoder.transformer.layers.0.attention.wq.weight": np.ones((4, 4), np.float32),
        "vision_language_adapter.w_in.weight": np.ones((4, 4), np.float32),
        "patch_merger.merging_layer.weight": np.ones((4, 4), np.float32),
        "pre_mm_projector_norm.weight": np.ones(4, np.float32),
    }
    items = [*tensors.items(), *((k, from_numpy(v)) for k, v in tower.items())]
    write_tensors(tmp_path / "consolidated.safetensors", items, None, None)
    params = {**args.to_params(), "vision_encoder": {"hidden_size": 4, "image_token_id": 10}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.warns(UserWarning, match="images are not supported"):
        ckpt = read_checkpoint(tmp_path)
    assert ckpt.args == args
    assert set(ckpt.tensors) == set(tensors)


@pytest.mark.parametrize("side", ["hf:cpu:float32", "mlx-lm:cpu:float32"])
@pytest.mark.parametrize("name", ["ministral", "ministral3", "mistral-head-dim"])
def test_diff_lines_the_taps_up_with_the_references(name, side):
    """Every tap of ours against transformers' and mlx-lm's own models of the family, past the
    window and the query scaling's first periods (mlx-lm's llama windows only the layers
    layer_types lists as sliding: the mistral case stays within its window there)."""
    from mistral.checkpoint import Checkpoint
    from mistral.diff import load_side, run_diff
    from mistral.taps import tap_names
    from tests.helpers import ROOT

    args = CASES[name]
    c = Checkpoint(ROOT, "mistral", args, mistral.weights.random_weights(args, seed=6))
    length = W if side.startswith("mlx-lm") and name == "mistral-head-dim" else 3 * W
    tokens = random_rows([length], args.vocab_size, 7)[0]
    report = run_diff(load_side("torch:cpu:float32", c), load_side(side, c), tokens)
    assert [t.name for t in report.taps] == tap_names(args)
    assert report.agree, report.table()


NEW_CONFIGS = [
    "mistral-nemo-12b",
    "ministral-8b",
    "ministral-3-3b",
    "ministral-3-8b",
    "ministral-3-14b",
    "mistral-small-3.1-24b",
    "devstral-small",
    "codestral-22b",
]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_the_shipped_shapes_parse_and_have_a_transformers_type(name):
    from mistral.bench import decode_bytes, prefill_flops
    from mistral.checkpoint import CONFIGS
    from mistral.weights import expected_shapes

    args = ModelArgs.from_file(CONFIGS / f"{name}.json")
    params = sum(int(np.prod(s)) for s in expected_shapes(args).values())
    billions = {"nemo": 12.2, "ministral-8b": 8.0, "3-3b": 3.4, "3-8b": 8.5, "24b": 23.6}
    billions |= {"3-14b": 13.5}  # Mistral's model card: a 13.5B language model
    billions |= {"devstral": 23.6, "22b": 22.2}
    assert any(k in name and round(params / 1e9, 1) == v for k, v in billions.items()), params
    assert hf_config.model_type(args) in hf_config.CLASSES
    assert prefill_flops(args, 16, 1) > 0
    fake = {k: type("T", (), {"shape": s})() for k, s in expected_shapes(args).items()}
    assert decode_bytes(args, fake, 2, 64, 1) > 0


def test_convert_and_info_on_a_ministral3_folder(tmp_path):
    """`mistral convert` both ways on the newer keys, and `mistral info` saying what is new."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    model = hf_model_of(CASES["ministral3"])
    model.save_pretrained(tmp_path / "hf")

    def cli(*argv: str) -> subprocess.CompletedProcess:
        run = [sys.executable, "-m", "mistral", *argv]
        return subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)

    assert (
        cli("convert", str(tmp_path / "hf"), str(tmp_path / "m"), "--to", "mistral").returncode == 0
    )
    assert cli("convert", str(tmp_path / "m"), str(tmp_path / "h2"), "--to", "hf").returncode == 0
    info = cli("info", str(tmp_path / "m"))
    assert info.returncode == 0, info.stderr
    assert "tied to the embeddings" in info.stdout
    assert "YaRN x4 of 8" in info.stdout and "1 + 0.3 ln(1 + floor(pos / 8))" in info.stdout
    back = mistral.load(tmp_path / "h2", device="cpu", dtype="float32")
    rows = random_rows([3 * W], back.args.vocab_size, 8)
    assert max_diff(back.logits(rows), hf_logits(model, rows)) <= 1e-4
    windows = cli("info", str(tmp_path / "m"), "--json")
    assert json.loads(windows.stdout)["args"]["tied_embeddings"] is True
