"""`mistral bench` runs and its numbers are sane; speed targets are checked by running it."""

import dataclasses
import math

import numpy as np
import pytest

from mistral.bench import (
    BenchSetup,
    Timing,
    decode_bytes,
    measure_rounds,
    prefill_flops,
    run_bench,
)
from mistral.bench_report import format_report
from mistral.cache import plan_prefill
from mistral.weights import random_weights
from tests.helpers import ROOT, tiny


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
    by = report["decode_by_context"]  # the step clocks time the decode steps of these runs
    assert by["steps"][0][0] == 25 and by["steps"][-1][1] == 24 + 7
    for r in report["results"]:
        tok_s = by["tok_s"][r["name"]]
        assert len(tok_s) == len(by["context"]) > 0 and all(v > 0 for v in tok_s)
        steps = [hi - lo + 1 for lo, hi in by["steps"]]
        implied = sum(steps) / sum(n / v for n, v in zip(steps, tok_s, strict=True))
        assert implied == pytest.approx(r["decode_tok_s"]["median"], rel=0.3)


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


def fake_runs(decode_s: dict[str, list[float]], prefill_s: float = 0.5):
    """Runs whose n-th call takes the n-th of its decode times (prefill always the same)."""

    def run_of(times):
        calls = iter(times)
        return lambda: Timing(prefill_s=prefill_s, decode_s=next(calls), peak_bytes=1)

    return [(name, "cpu", "float32", run_of(times)) for name, times in decode_s.items()]


def report_of(results, prompt_len=8, gen_len=5):
    """The report dict of made-up results, on the torch meter of a tiny model."""
    from mistral.bench import report
    from mistral.contract import backend

    for r in results:
        r.peak_bytes = r.peak_bytes or [2**20]  # measured in the warm-up, which these skip
    args = tiny("tiny-dense")
    setup = BenchSetup(
        args,
        random_weights(args),
        "made-up",
        "torch",
        "cpu",
        "float32",
        prompt_len,
        gen_len,
        1,
        len(results[0].decode_tok_s),
        1,
        compare=tuple(r.name for r in results[1:]),
    )
    return report(setup, backend("torch").meter(args, "cpu", "float32"), results, 1e10)


def test_runs_spread_over_2x_make_the_ratio_unreliable_in_the_text_and_the_json():
    """Ours decodes 3.5x faster in one round than in another (a noisy machine): the decode ratio
    is flagged, the prefill ratio (steady) is not; a reference's spread flags its own ratio."""
    runs = fake_runs(
        {"ours (torch)": [0.1, 0.35, 0.2], "hf": [0.2, 0.2, 0.21], "mlx-lm": [0.2] * 3}
    )
    results, _ = measure_rounds(runs, 1, 8, 5, repeats=3, bandwidth=lambda: 1e10)
    rep = report_of(results)
    assert rep["results"][0]["decode_tok_s"]["spread"] == pytest.approx(3.5)
    assert rep["results"][1]["decode_tok_s"]["spread"] == pytest.approx(1.05)
    assert rep["ratios"]["hf"]["unreliable"] == ["decode"]
    assert rep["ratios"]["mlx-lm"]["unreliable"] == ["decode"]
    [warning] = rep["warnings"]
    assert "ours (torch) decode tok/s" in warning and "x3.5" in warning
    assert "ours / hf decode" in warning and "unreliable" in warning
    text = format_report(rep)
    assert f"warning: {warning}" in text
    assert "ours / hf: decode x" in text and "(unreliable: decode)" in text
    steady = fake_runs({"ours (torch)": [0.1, 0.19, 0.15], "hf": [0.1, 0.3, 0.2]})
    results, _ = measure_rounds(steady, 1, 8, 5, repeats=3, bandwidth=lambda: 1e10)
    rep = report_of(results)  # ours within 2x; hf spreads 3x: only its own ratio is in doubt
    assert rep["ratios"]["hf"]["unreliable"] == ["decode"] and len(rep["warnings"]) == 1
    assert rep["warnings"][0].startswith("hf decode tok/s")


def test_columns_are_as_wide_as_their_values():
    """A 10-second time to first token (10291.4 ms) no longer runs into the next column."""
    runs = fake_runs({"ours (torch)": [0.2], "hf": [0.2]}, prefill_s=10.2914)
    results, _ = measure_rounds(runs, 1, 8, 5, repeats=1, bandwidth=lambda: 1e10)
    results[0].prefill_tok_s = [1.6]
    lines = format_report(report_of(results)).splitlines()
    head = next(i for i, line in enumerate(lines) if "TTFT ms" in line)
    table = lines[head : head + 3]
    for line in table[1:]:
        cells = line.split("  ")
        cells = [c.strip() for c in cells if c.strip()]
        assert len(cells) == 5, line  # name, prefill, TTFT, decode, memory: two spaces apart
    assert table[1].split("  ")[0].strip() == "ours (torch)"
    assert "10291.4 (10291.4-10291.4)" in table[1] and "1.6 (1.6-1.6)  " in table[1]
    ends = {len(line) for line in table}
    assert len(ends) == 1  # right-aligned columns end together
    for title in ("prefill tok/s", "TTFT ms", "decode tok/s"):  # each heads its column
        end = table[0].index(title) + len(title)
        assert all(line[end - 1] != " " and line[end : end + 2] == "  " for line in table[1:])


def test_the_json_names_the_package_versions_and_the_machine(tmp_path, monkeypatch):
    """Versions as installed, read without importing a framework; the machine's CPU, cores,
    memory and GPUs (here a stand-in nvidia-smi on the PATH reports one)."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    from mistral.bench import machine, versions

    code = (
        "import sys\n"
        "from mistral.bench import machine, versions\n"
        "v = versions(); machine()\n"
        "assert not {'torch', 'mlx', 'transformers', 'mlx_lm'} & set(sys.modules), 'imported'\n"
        "print(v['numpy'], v['torch'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    np_version, torch_version = out.stdout.split()
    assert np_version == importlib.metadata.version("numpy")
    assert torch_version == importlib.metadata.version("torch")
    monkeypatch.setattr("mistral.bench.PACKAGES", ("numpy", "no-such-package-here"))
    assert versions() == {"numpy": np_version, "no-such-package-here": None}
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    m = machine()
    assert m["gpus"] == ["NVIDIA H200"]
    assert m["cpu"] and m["cpu_cores"] >= m["cpu_cores_usable"] >= 1
    assert m["memory_bytes"] > 2**28 and m["platform"] and m["python"]


def test_decode_speed_is_binned_by_context():
    """Step j of a run has prompt_len + j tokens in its context; a bin's speed is its steps
    over their time, the median over the runs."""
    from mistral.bench import Result, decode_by_context

    args = tiny("tiny-dense")
    s = BenchSetup(args, {}, "made-up", "torch", "cpu", "float32", 10, 17, 2, 2, 1)
    slow = [0.001 * (1 + j) for j in range(16)]  # 16 decode steps, slower as the context grows
    r = Result("ours (torch)", "cpu", "float32", decode_steps=[slow, [2 * t for t in slow]])
    by = decode_by_context(s, [r], bins=4)
    assert by["steps"] == [[11, 14], [15, 18], [19, 22], [23, 26]]
    assert by["context"] == [12.5, 16.5, 20.5, 24.5]
    runs = [[2 * 4 / sum(t[i : i + 4]) for i in (0, 4, 8, 12)] for t in r.decode_steps]
    assert by["tok_s"]["ours (torch)"] == pytest.approx(list(np.median(runs, axis=0)))
    assert by["tok_s"]["ours (torch)"][0] > by["tok_s"]["ours (torch)"][-1]


def test_the_plot_draws_one_line_per_implementation(tmp_path):
    """On a real (tiny) bench: each implementation's decode speed against the context, legend
    outside the axes."""
    from mistral.bench_report import figure, plot

    args = tiny("tiny-window")
    setup = BenchSetup(
        args,
        random_weights(args),
        "tiny-window",
        "torch",
        "cpu",
        "float32",
        4,
        40,
        1,
        1,
        1,
        compare=("hf",),
    )
    rep = run_bench(setup)
    by = rep["decode_by_context"]
    assert by["steps"][0][0] == 5 and by["steps"][-1][1] == 4 + 39
    fig = figure(rep)
    ax = fig.axes[0]
    drawn = {line.get_label(): line for line in ax.get_lines()}
    assert set(drawn) == {"ours (torch)", "hf", f"sliding window {args.sliding_window}"}
    for name in ("ours (torch)", "hf"):
        assert list(drawn[name].get_xdata()) == by["context"]
        assert all(y > 0 for y in drawn[name].get_ydata())
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    plot(rep, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line_before_the_run(tmp_path):
    """Refused before anything runs: the config named does not even exist."""
    import subprocess
    import sys

    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
        "sys.argv = ['mistral', *sys.argv[1:]]\n"
        "runpy.run_module('mistral', run_name='__main__')\n"
    )
    argv = ["bench", "--config", "nope", "--plot", str(tmp_path / "b.png")]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--plot needs matplotlib: pip install matplotlib" in lines[0] and "[plot]" in lines[0]
