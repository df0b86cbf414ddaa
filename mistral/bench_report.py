"""The bench report for people: a text table whose columns fit their values, the ratios with
their warnings, the bounds, and decode tokens/s against the context length as a plot."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only to draw
    from matplotlib.figure import Figure


def results_table(results: list[dict]) -> list[str]:
    """One row per implementation; each column as wide as its widest cell, two spaces apart."""

    def cell(r: dict, key: str, scale: float = 1.0) -> str:
        m, lo, hi = (r[key][k] * scale for k in ("median", "min", "max"))
        return f"{m:.1f} ({lo:.1f}-{hi:.1f})"

    head = ["", "prefill tok/s", "TTFT ms", "decode tok/s", "peak MiB"]
    rows = [
        [
            r["name"],
            cell(r, "prefill_tok_s"),
            cell(r, "ttft_s", 1e3),
            cell(r, "decode_tok_s"),
            f"{r['peak_bytes']['median'] / 2**20:.0f}",
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = []
    for row in [head, *rows]:
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    return lines


def machine_line(report: dict) -> str:
    m = report["machine"]
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m["memory_bytes"] else ""
    gpus = f", {', '.join(m['gpus'])}" if m["gpus"] else ""
    cores = f"{m['cpu_cores_usable']} of {m['cpu_cores']} cores"
    installed = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    return f"machine: {m['cpu']} ({cores}){memory}{gpus}; {installed}"


def format_report(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"{s['source']}: batch {s['batch']}, prompt {s['prompt_len']}, generate "
        f"{s['gen_len']}, {s['device']} {s['dtype']} ({s['products']}), median of "
        f"{s['repeats']} (min-max)",
        machine_line(report),
        "",
        *results_table(report["results"]),
        "",
    ]
    for name, ratio in report["ratios"].items():
        doubt = f" (unreliable: {', '.join(ratio['unreliable'])})" if ratio["unreliable"] else ""
        lines.append(
            f"ours / {name}: decode x{ratio['decode']:.2f}, prefill x{ratio['prefill']:.2f}{doubt}"
        )
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines.append(
        "peak MiB: what each adds to the process at its peak (weights, cache, activations)"
    )
    bw = report["bandwidth_bytes_s"] / 1e9
    step = report["decode_bytes_per_step"] / 2**20
    lines.append(
        f"decode bound: {step:.0f} MiB read per step at {bw:.1f} GB/s (copy) = "
        f"{report['decode_bound_tok_s']:.1f} tok/s; ours reaches "
        f"{report['decode_fraction_of_bound']:.0%}"
    )
    flop_s = report["prefill_fraction_of_matmul"] * report["matmul_flop_s"]
    lines.append(
        f"prefill: {report['prefill_flops'] / 1e9:.1f} GFLOP at {flop_s / 1e12:.3f} TFLOP/s = "
        f"{report['prefill_fraction_of_matmul']:.0%} of a large square product here "
        f"({report['matmul_flop_s'] / 1e12:.3f} TFLOP/s, as the projections multiply)"
    )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Draws ``figure(report)`` to a PNG file."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits right of the axes
    plt.close(fig)


def figure(report: dict) -> Figure:
    """Decode tokens/s against the context length (decode_by_context), one line per
    implementation measured; the sliding window, where the config has one, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, by = report["setup"], report["decode_by_context"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in by["tok_s"].items():
        if values:
            ax.plot(by["context"], values, marker="o", ms=3, label=name)
    window = s["args"].get("sliding_window")
    lo, hi = s["prompt_len"] + 1, s["prompt_len"] + s["gen_len"] - 1
    for w in sorted({w for w in np.ravel([window]).tolist() if w and lo <= w <= hi}):
        ax.axvline(w, ls="--", color="grey", lw=1, label=f"sliding window {w}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length: prompt and generated tokens at the decode step")
    ax.set_ylabel(f"decode tokens/s ({s['batch']} row{'s' if s['batch'] > 1 else ''})")
    ax.set_title(
        f"{s['source']}: {s['device']} {s['dtype']}, prompt {s['prompt_len']}, "
        f"{s['gen_len']} generated\nmedian of {s['repeats']} runs per point",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, alpha=0.3)
    return fig
