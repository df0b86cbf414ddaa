"""`mistral diff`: agreement where there should be, and a planted mistake located where it is."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import mistral.weights
from mistral.checkpoint import DEFAULT_MODEL, Checkpoint, read_checkpoint, write_checkpoint
from mistral.diff import continuation, load_side, plot, run_diff
from mistral.taps import tap_names
from mistral.tokenizer import Tokenizer
from mistral.weights import random_weights
from tests.helpers import ROOT, random_rows, tiny


def ckpt(args, tensors) -> Checkpoint:
    return Checkpoint(ROOT, "mistral", args, tensors)


@pytest.mark.parametrize("config", ["tiny-window", "tiny-moe"])
def test_torch_and_mlx_agree_on_every_tap(config):
    args = tiny(config)
    c = ckpt(args, random_weights(args, seed=1))
    tokens = random_rows([40], args.vocab_size, 0)[0]
    report = run_diff(load_side("torch:cpu:float32", c), load_side("mlx:cpu:float32", c), tokens)
    assert [t.name for t in report.taps] == tap_names(args)
    assert all(t.rel <= 1e-5 for t in report.taps), max(t.rel for t in report.taps)
    assert report.agree and report.first_divergence is None
    assert "agree" in report.table()
    assert report.logits["top1"] == 1.0


@pytest.mark.parametrize("side", ["hf:cpu:float32", "mlx-lm:cpu:float32"])
def test_outside_references_agree_within_the_window(side):
    args = tiny("tiny-moe")
    c = ckpt(args, random_weights(args, seed=2))
    tokens = random_rows([args.sliding_window], args.vocab_size, 1)[0]
    report = run_diff(load_side("torch:cpu:float32", c), load_side(side, c), tokens)
    assert report.agree, report.table()
    assert {t.kind for t in report.taps} >= {"q", "k", "router_logits", "experts", "residual"}


def test_mlx_lm_past_the_window_is_located_at_the_first_attention():
    """mlx-lm attends past Mistral's sliding window: the diff finds it, in generation too."""
    args = tiny("tiny-window")
    c = ckpt(args, random_weights(args, seed=3))
    tokens = random_rows([args.sliding_window - 2], args.vocab_size, 2)[0]
    report = run_diff(
        load_side("mlx:cpu:float32", c), load_side("mlx-lm:cpu:float32", c), tokens, generate=12
    )
    step = report.generation["first_difference"]
    assert step is not None and step >= 2  # identical until the window is exceeded
    assert report.first_divergence == "layers.0.attention"
    assert "jumps at layer 0" in report.growth
    g = report.generation  # no tokenizer: the continuations as token ids
    assert g["text"] is None and f"  b:    {g['b'][step:]}" in report.table()


def test_skipped_wk_permutation_in_one_layer_is_named(tmp_path):
    """A conversion mistake: layer 1's wk written to an HF folder without its row permutation."""
    args = tiny("tiny-window")
    weights = random_weights(args, seed=4)
    write_checkpoint(tmp_path / "hf", "hf", args, weights)
    bad = read_checkpoint(tmp_path / "hf")
    wk = weights["layers.1.attention.wk.weight"]
    # Reading un-permutes every wk; this one was never permuted, so reading scrambles it.
    from mistral.hf import permute_rows

    bad.tensors["layers.1.attention.wk.weight"] = permute_rows(wk, args.n_kv_heads, to_hf=False)
    tokens = random_rows([24], args.vocab_size, 3)[0]
    report = run_diff(load_side("torch", ckpt(args, weights)), load_side("torch", bad), tokens)
    assert report.first_divergence == "layers.1.k"
    assert "jumps at layer 1" in report.growth


def test_changed_rope_theta_is_named_at_the_first_q():
    args = tiny("tiny-dense")
    weights = random_weights(args, seed=5)
    wrong = dataclasses.replace(args, rope_theta=1e4)
    tokens = random_rows([20], args.vocab_size, 4)[0]
    a, b = load_side("torch", ckpt(args, weights)), load_side("mlx", ckpt(wrong, weights))
    report = run_diff(a, b, tokens)
    assert report.first_divergence == "layers.0.q"


def test_swapped_expert_weights_are_named_at_that_layers_feed_forward():
    args = tiny("tiny-moe")
    weights = random_weights(args, seed=6)
    swapped = dict(weights)
    for w in ("w1", "w2", "w3"):
        a, b = (
            f"layers.1.feed_forward.experts.0.{w}.weight",
            f"layers.1.feed_forward.experts.1.{w}.weight",
        )
        swapped[a], swapped[b] = weights[b], weights[a]
    tokens = random_rows([30], args.vocab_size, 5)[0]
    a, b = load_side("torch", ckpt(args, weights)), load_side("mlx", ckpt(args, swapped))
    report = run_diff(a, b, tokens)
    assert report.first_divergence == "layers.1.feed_forward"
    router = next(t for t in report.taps if t.name == "layers.1.router_logits")
    assert not router.exceeds  # routing is intact: the experts behind it were swapped


def test_bfloat16_against_float32_reports_error_growth_and_top1(tmp_path):
    args = tiny("tiny-window")
    c = ckpt(args, random_weights(args, seed=7))
    tokens = random_rows([30], args.vocab_size, 6)[0]
    report = run_diff(load_side("torch:cpu:float32", c), load_side("torch:cpu:bfloat16", c), tokens)
    residual = [t.rel for t in report.taps if t.kind == "residual"]
    assert all(1e-4 < r < 0.1 for r in residual)  # bfloat16 rounding, not a bug
    assert report.taps[0].tolerance == 5e-2
    assert "per layer" in report.growth
    assert 0.0 <= report.logits["top1"] <= 1.0 and "top-1 agreement" in report.table()
    out = report.to_json()
    json.dumps(out)
    assert out["logits"]["top1"] == report.logits["top1"] and len(out["taps"]) == len(report.taps)
    plot(report, str(tmp_path / "err.png"))
    assert (tmp_path / "err.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_taps_cost_nothing_when_off(monkeypatch):
    """Without tracing no tap is stored: the forward keeps no reference to intermediates, and a
    trace switches the recorders back off when it is done."""
    args = tiny("tiny-moe")
    c = ckpt(args, random_weights(args, seed=8))
    _, side = load_side("torch:cpu:float32", c)
    from mistral.taps import Recorder

    seen = []
    original = Recorder.__call__

    def spy(self, name, x):
        seen.append(self.store)
        return original(self, name, x)

    monkeypatch.setattr(Recorder, "__call__", spy)
    side.model.logits([[1, 2, 3]])
    assert len(seen) == len(tap_names(args)) and all(t is None for t in seen)
    side.model.trace([1, 2, 3])
    seen.clear()
    side.model.logits([[1, 2, 3]])
    assert seen and all(t is None for t in seen)
    assert side.model.runner.model.training is False


def test_logit_figures_equal_a_direct_computation():
    """KL(a||b), top-1/top-5 agreement and cosine against torch's own functions."""
    import numpy as np
    import torch

    from mistral.diff import compare_arrays, logit_agreement

    rng = np.random.default_rng(4)
    a = rng.normal(0, 2, (30, 64)).astype(np.float32)
    b = a + rng.normal(0, 0.7, a.shape).astype(np.float32)
    got = logit_agreement(a, b)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    kl = torch.nn.functional.kl_div(
        tb.log_softmax(-1), ta.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert abs(got["kl"] - kl.item()) <= 1e-9 * max(1.0, kl.item())
    assert got["top1"] == (ta.argmax(-1) == tb.argmax(-1)).double().mean().item()
    top5a, top5b = ta.topk(5).indices.tolist(), tb.topk(5).indices.tolist()
    overlap = np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top5a, top5b, strict=True)])
    assert got["top5"] == pytest.approx(overlap, abs=1e-12) and 0 < got["top5"] < 1
    cosine = torch.nn.functional.cosine_similarity(ta.flatten(), tb.flatten(), dim=0).item()
    row = compare_arrays("layers.0.residual", a, b, "float32", "float32")
    assert row.cosine == pytest.approx(cosine, abs=1e-12)
    assert row.rel == pytest.approx(np.abs(a - b).max() / np.abs(a).max(), rel=1e-6)


def test_a_small_float32_error_is_flagged_at_its_place():
    """One norm weight off by 5e-5 relative: above float32's tolerance (1e-5), so the sides
    disagree, first at that tap (a tolerance 10x looser would let it through)."""
    args = tiny("tiny-window")
    weights = random_weights(args, seed=9)
    nudged = dict(weights)
    key = "layers.1.attention_norm.weight"
    nudged[key] = mistral.weights.from_numpy(weights[key].to_numpy() * (1 + 5e-5))
    tokens = random_rows([20], args.vocab_size, 3)[0]
    report = run_diff(
        load_side("torch:cpu:float32", ckpt(args, weights)),
        load_side("torch:cpu:float32", ckpt(args, nudged)),
        tokens,
    )
    assert not report.agree and report.first_divergence == "layers.1.attention_norm"
    assert 2e-5 < report.taps[[t.name for t in report.taps].index(key[:-7])].rel < 1e-4


def plant_in_cached_steps(monkeypatch, reference: str) -> None:
    """A bug in the reference's cached decode steps only: the values of a token fed alone are
    stored negated. Its prefill and its uncached forwards stay right."""
    if reference == "mlx-lm":
        from mlx_lm.models.cache import KVCache as cache_class

        def planted(self, keys, values):
            return original(self, keys, -values if keys.shape[2] == 1 else values)

    else:
        from transformers.cache_utils import Cache as cache_class

        def planted(self, keys, values, layer_idx, *args, **kwargs):
            values = -values if keys.shape[-2] == 1 else values
            return original(self, keys, values, layer_idx, *args, **kwargs)

    original = cache_class.update if reference == "hf" else cache_class.update_and_fetch
    name = "update" if reference == "hf" else "update_and_fetch"
    monkeypatch.setattr(cache_class, name, planted)


@pytest.mark.parametrize("ours, reference", [("mlx", "mlx-lm"), ("torch", "hf")])
def test_at_a_split_the_taps_are_those_the_tokens_were_chosen_from(monkeypatch, ours, reference):
    """The greedy tokens split where the planted bug first acts (a decode step); the taps shown
    there are of that cached step, so they name layer 0's attention and the logits disagree
    (top-1 0%). Traced in one uncached forward of the prefix instead, the reference is right and
    both sides agree on every tap, top-1 100%, although their tokens differ."""
    plant_in_cached_steps(monkeypatch, reference)
    c = read_checkpoint(DEFAULT_MODEL)
    tok = Tokenizer(c.tokenizer_path)
    prompt = tok.encode("And God said")
    a, b = load_side(f"{ours}:cpu:float32", c), load_side(f"{reference}:cpu:float32", c)
    report = run_diff(a, b, prompt, generate=6, decode=continuation(tok))
    g = report.generation
    step = g["first_difference"]
    assert step is not None and step >= 1 and g["a_token"] != g["b_token"]
    assert report.logits["top1"] == 0.0, report.table()
    assert report.first_divergence == "layers.0.attention"
    assert len(report.tokens) == len(prompt) + step
    for (_, side), chosen in ((a, g["a"]), (b, g["b"])):  # each side's logits chose its token
        for i in (0, step):
            assert side.step_taps(prompt, chosen[:i])["logits"][-1].argmax() == chosen[i]
    # The continuations as text, split where the tokens split.
    text = g["text"]
    assert tok.decode(prompt + g["a"]) == tok.decode(prompt) + text["both"] + text["a"]
    assert tok.decode(prompt + g["b"]) == tok.decode(prompt) + text["both"] + text["b"]
    table = report.table()
    assert f"  a:    {text['a']!r}" in table and f"  b:    {text['b']!r}" in table
    assert f"differ first at step {step}" in table


def test_our_side_at_a_split_shows_the_logits_its_cached_step_drew_from(monkeypatch):
    """Our backends trace one uncached forward; at a split their logits tap is still the one
    their cached step chose from. Planted: torch's cache stores a decode step's values negated
    (its uncached trace stays right), against MLX: the logits at the split disagree."""
    import backends.torch.cache

    original = backends.torch.cache.LayerCache.update

    def planted(self, k, v, step):
        return original(self, k, -v if k.shape[2] == 1 else v, step)

    monkeypatch.setattr(backends.torch.cache.LayerCache, "update", planted)
    args = tiny("tiny-dense")
    c = ckpt(args, random_weights(args, seed=10))
    prompt = random_rows([12], args.vocab_size, 8)[0]
    report = run_diff(load_side("torch", c), load_side("mlx", c), prompt, generate=8)
    g = report.generation
    assert g["first_difference"] is not None and g["first_difference"] >= 1
    assert report.logits["top1"] == 0.0, report.table()
    assert not report.agree


def two_layer_report():
    """A report over made-up taps of two layers: exact zeros at the embeddings and at layer 0's
    attention, small errors elsewhere."""
    import numpy as np

    from mistral.diff import compare

    rng = np.random.default_rng(0)
    names = ["embeddings"]
    names += [f"layers.{i}.{k}" for i in range(2) for k in ("attention", "residual")]
    taps_a = {n: rng.normal(size=(3, 8)) for n in [*names, "norm", "logits"]}
    taps_b = {
        n: x if n in ("embeddings", "layers.0.attention") else x + 1e-6 * (1 + len(n))
        for n, x in taps_a.items()
    }
    report = compare(
        taps_a, taps_b, "torch:cpu:float32", "mlx:cpu:float32", "float32", "float32", [1, 2, 3]
    )
    report.a_model, report.b_model = "/folders/a", "/folders/b-hf"
    return report


def test_the_plot_keeps_its_legend_off_the_data_and_marks_exact_zeros(tmp_path):
    """Zeros are not drawn as a made-up 1e-12 but masked in the lines and marked on the bottom
    edge; the embeddings, final norm and logits are drawn beside the layers; the legend sits
    outside the axes; the title names both sides and both folders."""
    import numpy as np

    from mistral.diff import figure

    report = two_layer_report()
    fig = figure(report)
    ax = fig.axes[0]
    in_data = [line for line in ax.get_lines() if line.get_transform() == ax.transData]
    ys = np.concatenate([np.asarray(line.get_ydata(), float) for line in in_data])
    assert np.isfinite(ys).any() and ys[np.isfinite(ys)].min() > 1e-9  # no floor value drawn
    assert np.isnan(ys).sum() == 2  # the two zeros, masked
    marks = [line for line in ax.get_lines() if line.get_marker() == "v" and len(line.get_xdata())]
    assert sorted(x for line in marks for x in line.get_xdata()) == [-1, 0]  # emb, layer 0
    around = next(line for line in in_data if line.get_label().startswith("embeddings"))
    assert sorted(around.get_xdata()) == [-1, 2, 3]  # embeddings, final norm, logits
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the axes, over no data
    title = ax.get_title()
    for name in (report.a, report.b, report.a_model, report.b_model):
        assert name in title
    import matplotlib.pyplot as plt

    plt.close(fig)
    plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rel tol" in report.table()


def run_without_matplotlib(*argv: str) -> subprocess.CompletedProcess:
    """`mistral ARGV` in a process where importing matplotlib fails."""
    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
        "sys.argv = ['mistral', *sys.argv[1:]]\n"
        "runpy.run_module('mistral', run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_plot_without_matplotlib_is_one_line_before_the_run(tmp_path):
    """Refused before anything is read or run: the model folder named does not even exist."""
    out = run_without_matplotlib(
        "diff", "--model", str(tmp_path / "nowhere"), "--plot", str(tmp_path / "p.png")
    )
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--plot needs matplotlib: pip install matplotlib" in lines[0]
    assert "[plot]" in lines[0]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_cached_step_is_traced_as_it_ran(backend):
    """Model.trace_step records the cached step itself: its logits are exactly the ones the
    generation drew the next token from, and in float32 its taps match an uncached trace's last
    row (the same computation, another order of summation)."""
    args = tiny("tiny-window")
    model = mistral.from_tensors(args, random_weights(args, seed=8), backend, "cpu")
    prompt = random_rows([args.sliding_window + 5], args.vocab_size, 9)[0]
    seen: list = []
    steps = model.stream([prompt], 6, observe=lambda x: seen.append(x.copy()))
    tokens = [t for (t,) in steps]
    taps = model.trace_step(prompt, tokens[:4])
    assert np.array_equal(taps["logits"], seen[4][:1])
    whole = model.trace(prompt + tokens[:4])
    assert set(taps) == set(whole)
    for name, a in taps.items():
        assert np.abs(a - whole[name][-1:]).max() <= 1e-4 * max(1.0, np.abs(a).max()), name
