"""`mistral bench` runs and its numbers are sane; speed targets are checked by running it."""

import dataclasses
import math

import pytest

from mistral.bench import (
    BenchSetup,
    Timing,
    decode_bytes,
    format_report,
    measure_rounds,
    prefill_flops,
    run_bench,
)
from mistral.cache import plan_prefill
from mistral.weights import random_weights
from tests.helpers import tiny


@pytest.mark.parametrize("backend, compare", [("torch", ("hf",)), ("mlx", ("mlx-lm",))])
def test_bench_reports_positive_finite_numbers_and_ratios(backend, compare):
    args = tiny("tiny-moe")
    setup = BenchSetup(
        args,
        random_weights(args),
        "tiny-moe",
        backend,
        "cpu",
        "float32",
        prompt_len=24,
        gen_len=8,
        batch=2,
        repeats=2,
        warmup=1,
        compare=compare,
    )
    seen = []
    report = run_bench(setup, progress=seen.append)
    names = [f"ours ({backend})", *compare]
    assert seen == [f"{n}: warm-up 1/1" for n in names] + ["round 1/2", "round 2/2"]
    assert [r["name"] for r in report["results"]] == [f"ours ({backend})", *compare]
    for r in report["results"]:
        for key in ("prefill_tok_s", "ttft_s", "decode_tok_s"):
            values = r[key]["runs"]
            assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        assert len(r["peak_bytes"]["runs"]) == 1  # measured in the warm-up
    ratio = report["ratios"][compare[0]]
    ours, theirs = report["results"]
    assert ratio["decode"] == pytest.approx(
        ours["decode_tok_s"]["median"] / theirs["decode_tok_s"]["median"]
    )
    assert report["bandwidth_bytes_s"] > 0 and report["decode_bound_tok_s"] > 0
    assert 0 < report["decode_fraction_of_bound"] < 10
    assert report["prefill_flops"] == prefill_flops(args, 24, 2)
    assert math.isfinite(report["matmul_flop_s"]) and report["matmul_flop_s"] > 0
    assert 0 < report["prefill_fraction_of_matmul"] < 10
    text = format_report(report)
    assert "decode bound" in text and f"ours / {compare[0]}" in text and "prefill:" in text
    assert report["setup"]["products"] in ("F.linear", "nn.Linear")  # tiny weights: in the cache
    assert f"cpu float32 ({report['setup']['products']})" in text


@pytest.mark.parametrize("backend, compare", [("torch", ("hf",)), ("mlx", ("mlx-lm",))])
def test_memory_is_what_each_implementation_adds(backend, compare):
    """Each implementation's memory is measured before the next is built: it holds at least its
    own weights (64 MiB here; transformers memory-maps its file, so of the embedding table only
    the rows read are resident), and not the other's too."""
    args = dataclasses.replace(tiny("tiny-dense"), vocab_size=2**17)
    weights = random_weights(args)
    nbytes = sum(t.nbytes for t in weights.values()) - weights["tok_embeddings.weight"].nbytes
    setup = BenchSetup(
        args, weights, "big-vocab", backend, "cpu", "float32", 8, 3, 1, 1, 1, compare=compare
    )
    for r in run_bench(setup)["results"]:
        assert nbytes <= r["peak_bytes"]["median"] < 3 * nbytes + 256 * 2**20, r["name"]


@pytest.mark.parametrize("config", ["tiny-window", "tiny-moe"])
def test_prefill_flops_count_what_a_prefill_computes(config):
    """Counted another way: the weights' own shapes (of the experts, the chosen ones) for every
    token, the planner's mask for the keys each query sees, logits for the last token only."""
    args = tiny(config)
    weights = random_weights(args)
    per_token = 0
    for name, t in weights.items():
        if name.startswith("layers.0.") and "norm" not in name:
            macs = t.shape[0] * t.shape[1]
            if ".experts." in name:
                macs = macs * args.moe.num_experts_per_tok / args.moe.num_experts
            per_token += macs
    prompt = 3 * (args.sliding_window or 10)  # past the window when there is one
    [plan] = plan_prefill([prompt], [args.sliding_window]).values()
    seen = int(plan.mask.sum())  # (query, key) pairs attention computes
    attention = 2 * args.n_heads * args.head_dim * seen  # QK^T and AV
    macs = args.n_layers * (prompt * per_token + attention) + args.dim * args.vocab_size
    assert prefill_flops(args, prompt, batch=3) == 3 * 2 * macs


def test_decode_bytes_count_weights_in_use_and_the_cache():
    args = tiny("tiny-moe")
    weights = random_weights(args)
    one = decode_bytes(args, weights, 4, context=10, batch=1)
    # The embedding table is read one row per token; of the experts, only the chosen ones.
    experts = sum(t.nbytes for k, t in weights.items() if ".experts." in k)
    table = weights["tok_embeddings.weight"].nbytes
    rest = sum(t.nbytes for t in weights.values()) - experts - table
    kv = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 10 * 4
    assert one == rest + experts // 2 + args.dim * 4 + kv
    # Past the window the cache read stops growing.
    assert decode_bytes(args, weights, 4, 1000, 1) == decode_bytes(args, weights, 4, 16, 1)


def test_implementations_take_turns_each_round():
    """One run of each per round with a bandwidth reading per round, so a machine that slows
    down partway slows every implementation, not the last one measured."""
    calls = []

    def run_of(name):
        def run():
            calls.append(name)
            return Timing(prefill_s=0.5, decode_s=0.25, peak_bytes=1)

        return run

    runs = [(n, "cpu", "float32", run_of(n)) for n in ("a", "b")]
    readings = iter([1.0, 3.0, 2.0])
    results, bandwidths = measure_rounds(runs, 2, 8, 5, repeats=3, bandwidth=lambda: next(readings))
    assert calls == ["a", "b"] * 3
    assert bandwidths == [1.0, 3.0, 2.0]
    assert [r.name for r in results] == ["a", "b"]
    assert results[0].prefill_tok_s == [2 * 8 / 0.5] * 3
    assert results[1].decode_tok_s == [2 * 4 / 0.25] * 3


def test_cpu_bandwidth_is_the_machines(monkeypatch):
    """On a CPU both runners report the same numpy copy on every core, not their framework's own
    copy (MLX's runs on one thread and put decode at "127% of the bound")."""
    import backends.mlx.measure as mlx_measure
    import backends.torch.measure as torch_measure
    from mistral.measure import cpu_copy_bandwidth

    bandwidth = cpu_copy_bandwidth(8 * 2**20)
    assert math.isfinite(bandwidth) and bandwidth > 1e8  # any machine moves 100 MB/s
    for module in (torch_measure, mlx_measure):
        monkeypatch.setattr(module, "cpu_copy_bandwidth", lambda nbytes: 12345.0)
    args = tiny("tiny-dense")
    assert torch_measure.Meter(args, "cpu", None).copy_bandwidth() == 12345.0
    assert mlx_measure.Meter(args, "cpu", None).copy_bandwidth() == 12345.0
