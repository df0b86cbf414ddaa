"""Where two runs part ways: tap-by-tap errors, the first divergence, and how the error grows.

Each side is ``backend:device:dtype`` (``torch:cpu:float32``, ``mlx:gpu:bfloat16``) or an
outside reference, ``hf`` (transformers) or ``mlx-lm``, holding the same weights. Errors are
measured per tap as max |a - b| / max |a| (relative to the tap's scale) and judged against the
tolerance of the coarser dtype of the pair (TOLERANCE, calibrated on the embedded model; README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from mistral.api import Model, from_tensors
from mistral.checkpoint import Checkpoint
from mistral.contract import REFERENCES, reference
from mistral.errors import MistralError
from mistral.fp8 import FP8Tensor
from mistral.quant import QuantizedTensor
from mistral.taps import kind, layer
from mistral.tokenizer import Tokenizer

if TYPE_CHECKING:  # matplotlib is imported only to draw
    from matplotlib.figure import Figure

# Relative error allowed per tap, by the coarser precision of the two sides: its dtype, or how its
# folder's weights are quantized (measured on the embedded model against its bfloat16 weights, the
# largest tap error: 8-bit 0.017, 4-bit 0.18, mxfp4 0.27, 3-bit 0.48; 6, 5 and 2 bits in between;
# FP8 in blocks of 128 0.060, and 0.076 with the activations quantized too, fp8 scaled).
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2, "8-bit": 5e-2, "6-bit": 0.1}
TOLERANCE |= {"fp8": 0.15, "fp8 scaled": 0.2}
TOLERANCE |= {"5-bit": 0.2, "4-bit": 0.4, "mxfp4": 0.6, "3-bit": 1.0, "2-bit": 2.0}
# Fraction of tokens whose chosen experts may differ (near-ties flip in half precision).
EXPERT_TOLERANCE = {"float32": 0.0, "float16": 0.05, "bfloat16": 0.1, "8-bit": 0.1, "6-bit": 0.15}
EXPERT_TOLERANCE |= {"fp8": 0.15, "fp8 scaled": 0.2}
EXPERT_TOLERANCE |= {"5-bit": 0.2, "4-bit": 0.25, "mxfp4": 0.3, "3-bit": 0.4, "2-bit": 0.5}
COARSENESS = list(TOLERANCE)


class Side(Protocol):
    """One side of a diff: one of our backends (OurSide) or an outside reference."""

    device: str
    dtype: str

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]: ...

    def greedy(self, prompt: list[int], n: int) -> list[int]: ...

    def step_taps(self, prompt: list[int], tokens: list[int]) -> dict[str, np.ndarray]: ...


class OurSide:
    """One of our backends, seen through the same calls as a reference."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.device, self.dtype = model.device, model.dtype

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        return self.model.trace(tokens)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.model.generate([prompt], n)[0]

    def step_taps(self, prompt: list[int], tokens: list[int]) -> dict[str, np.ndarray]:
        """The taps (1, ...) of the greedy step that chose the token after prompt + tokens,
        recorded as that cached step ran."""
        return self.model.trace_step(prompt, tokens)


def load_side(spec: str, ckpt: Checkpoint, fp8: str = "keep") -> tuple[str, Side]:
    """'torch:cpu:float32' -> ('torch:cpu:float32', side); device and dtype may be left out.
    ``fp8``: what our backend makes of the folder's FP8 weights (contract.FP8_MODES)."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise MistralError(f"side {spec!r}: expected backend[:device[:dtype]]")
    backend, device, dtype = [*parts, None, None][:3]
    device, dtype = device or None, dtype or None
    side: Side
    if backend in REFERENCES:  # contract.Reference does not declare step_taps yet
        if fp8 != "keep":
            raise MistralError(f"side {spec!r}: fp8 {fp8} is for our backends (torch, mlx)")
        side = cast(Side, reference(backend, ckpt.args, ckpt.tensors, device, dtype))
    else:
        built = (ckpt.args, ckpt.tensors, backend, device, dtype, str(ckpt.path))
        side = OurSide(from_tensors(*built, fp8=fp8))
    mode = "" if fp8 == "keep" else f" (fp8 {fp8})"
    return f"{backend}:{side.device}:{side.dtype}{mode}", side


def precision_of(ckpt: Checkpoint, dtype: str, fp8: str = "keep") -> str:
    """A side's precision for the tolerance: its dtype, or its folder's coarsest quantization
    (FP8 weights: "fp8", or "fp8 scaled" when the activations are quantized too)."""
    names = [
        "mxfp4" if t.q.mode == "mxfp4" else f"{t.q.bits}-bit"
        for t in ckpt.tensors.values()
        if isinstance(t, QuantizedTensor)
    ]
    if any(isinstance(t, FP8Tensor) for t in ckpt.tensors.values()):
        names.append("fp8 scaled" if fp8 == "scaled" else "fp8")
    return max([dtype, *names], key=COARSENESS.index)


def tolerance_for(dtype_a: str, dtype_b: str, table: dict[str, float] = TOLERANCE) -> float:
    coarser = max(dtype_a, dtype_b, key=COARSENESS.index)
    return table[coarser]


@dataclass
class TapDiff:
    name: str
    kind: str
    layer: int | None
    shape: list[int]
    max_abs: float
    rel: float
    cosine: float
    tolerance: float

    @property
    def exceeds(self) -> bool:
        return self.rel > self.tolerance


@dataclass
class Report:
    a: str
    b: str
    tokens: list[int]
    taps: list[TapDiff]
    logits: dict[str, float]
    first_divergence: str | None
    growth: str
    generation: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)
    a_model: str = ""  # the folders of the two sides
    b_model: str = ""

    @property
    def agree(self) -> bool:
        return self.first_divergence is None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for t, row in zip(self.taps, d["taps"], strict=True):
            row["exceeds"] = t.exceeds
        d["agree"] = self.agree
        return d

    def table(self) -> str:
        two = self.a_model != self.b_model
        lines = [
            f"a = {self.a}" + (f" ({self.a_model})" if two else ""),
            f"b = {self.b}" + (f" ({self.b_model})" if two else ""),
            f"{len(self.tokens)} tokens",
            "",
        ]
        lines.append(f"{'tap':<28}{'max |a-b|':>12}{'rel err':>12}{'cosine':>12}{'rel tol':>10}")
        for t in self.taps:
            mark = "  <-- first divergence" if t.name == self.first_divergence else ""
            flag = " !" if t.exceeds else "  "
            lines.append(
                f"{t.name:<28}{t.max_abs:>12.3e}{t.rel:>12.3e}{t.cosine:>12.8f}"
                f"{t.tolerance:>10.0e}{flag}{mark}"
            )
        if self.missing:
            lines.append(f"(reported by one side only: {', '.join(self.missing)})")
        lg = self.logits
        agreement = f"top-1 agreement {lg['top1']:.2%}, top-5 agreement {lg['top5']:.2%}"
        lines += ["", f"logits: {agreement}, KL(a||b) {lg['kl']:.3e} nats per position"]
        if self.first_divergence is None:
            lines.append("verdict: the two sides agree: every tap is within its tolerance")
        else:
            lines.append(f"verdict: first divergence at {self.first_divergence}; {self.growth}")
        if self.generation:
            lines += generation_lines(self.generation)
        return "\n".join(lines)


def generation_lines(g: dict[str, Any]) -> list[str]:
    """The greedy runs of both sides as text (token ids without a tokenizer), and where they
    split: what both produced, then what each produced from there."""
    step, text = g["first_difference"], g["text"]
    if step is None:
        both = repr(text["both"]) if text else str(g["a"])
        return [
            f"generation: {g['steps']} greedy tokens, identical on both sides "
            "(the taps above are of the last step)",
            f"  both: {both}",
        ]
    if text:
        shown = [repr(text[k]) for k in ("both", "a", "b")]
    else:
        shown = [str(g["a"][:step]), str(g["a"][step:]), str(g["b"][step:])]
    return [
        f"generation: the greedy tokens differ first at step {step} ({g['a_token']} vs "
        f"{g['b_token']}); the taps above are of that step, as each side chose its token:",
        *(f"  {label:<5} {x}" for label, x in zip(("both:", "a:", "b:"), shown, strict=True)),
    ]


def compare_arrays(name: str, a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str) -> TapDiff:
    if a.shape != b.shape:
        raise MistralError(f"tap {name}: shapes differ, {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if kind(name) == "experts":  # fraction of tokens routed to a different set of experts
        differ = float((a64 != b64).any(-1).mean()) if a.size else 0.0
        tol = tolerance_for(dtype_a, dtype_b, EXPERT_TOLERANCE)
        return TapDiff(
            name, "experts", layer(name), list(a.shape), differ, differ, 1.0 - differ, tol
        )
    diff = np.abs(a64 - b64)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(a64).max()) if a.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    cosine = float(a64.ravel() @ b64.ravel() / (na * nb)) if na > 0 and nb > 0 else 1.0
    tol = tolerance_for(dtype_a, dtype_b)
    return TapDiff(name, kind(name), layer(name), list(a.shape), max_abs, rel, cosine, tol)


def logit_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """(T, V) logits of both sides: top-1 and top-5 agreement, mean KL(a || b)."""
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    k = min(5, a.shape[-1])
    ta, tb = np.argsort(-a, -1)[:, :k], np.argsort(-b, -1)[:, :k]
    top5 = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))
    la = a.astype(np.float64) - np.logaddexp.reduce(a.astype(np.float64), -1, keepdims=True)
    lb = b.astype(np.float64) - np.logaddexp.reduce(b.astype(np.float64), -1, keepdims=True)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    return {"top1": top1, "top5": top5, "kl": max(kl, 0.0)}


def describe_growth(taps: list[TapDiff], first: TapDiff | None) -> str:
    """Whether the error jumps at one place or grows layer by layer along the residual stream."""
    residual = [t.rel for t in taps if t.kind == "residual"]
    if first is not None and first.layer is not None:
        before = [t for t in taps if t.kind == first.kind and t.layer == first.layer - 1]
        prev = before[0].rel if before else 0.0
        if prev <= first.tolerance and first.rel > 10 * max(prev, 1e-12):
            ratio = "from nothing" if prev == 0 else f"{first.rel / prev:.0f}x the layer before"
            return f"the error jumps at layer {first.layer} ({first.kind}: {ratio})"
    if len(residual) >= 2 and residual[0] > 0:
        per_layer = (residual[-1] / residual[0]) ** (1 / (len(residual) - 1))
        trend = "grows" if per_layer > 1.2 else "stays about flat"
        return (
            f"the residual error {trend} layer by layer (x{per_layer:.2f} per layer, "
            f"{residual[0]:.1e} -> {residual[-1]:.1e})"
        )
    if first is not None and first.layer is None:
        return f"the error appears at {first.name}"
    return "no per-layer growth to report"


def compare(
    taps_a: dict[str, np.ndarray],
    taps_b: dict[str, np.ndarray],
    a: str,
    b: str,
    dtype_a: str,
    dtype_b: str,
    tokens: list[int],
) -> Report:
    """Compares every tap both sides report, in side a's forward order."""
    common = [n for n in taps_a if n in taps_b]
    missing = [n for n in taps_a if n not in taps_b] + [n for n in taps_b if n not in taps_a]
    rows = [compare_arrays(n, taps_a[n], taps_b[n], dtype_a, dtype_b) for n in common]
    first = next((t for t in rows if t.exceeds), None)
    return Report(
        a=a,
        b=b,
        tokens=list(tokens),
        taps=rows,
        logits=logit_agreement(taps_a["logits"], taps_b["logits"]),
        first_divergence=first.name if first else None,
        growth=describe_growth(rows, first),
        missing=missing,
    )


# (the tokens before, the new tokens) -> the text of the new tokens as they read after the others
Decode = Callable[[list[int], list[int]], str]


def continuation(tokenizer: Tokenizer) -> Decode:
    """The text of new tokens as they read after the tokens before them (ids the tokenizer does
    not have are shown as ids)."""

    def text(before: list[int], new: list[int]) -> str:
        if any(not 0 <= t < tokenizer.vocab_size for t in before + new):
            return f"{new} (ids outside the tokenizer)"
        decoder = tokenizer.decoder(after=before)
        return "".join(decoder.push(t) for t in new) + decoder.flush()

    return text


def greedy_split(
    a: Side, b: Side, prompt: list[int], n: int, decode: Decode | None
) -> dict[str, Any]:
    """Both sides decode ``n`` tokens greedily: the first step where they differ, and the
    continuations as text when ``decode`` is given."""
    ga, gb = a.greedy(prompt, n), b.greedy(prompt, n)
    step = next((i for i, (x, y) in enumerate(zip(ga, gb, strict=True)) if x != y), None)
    at = step if step is not None else n - 1
    text = None
    if decode is not None:
        common = ga[:at] if step is not None else ga
        text = {"both": decode(prompt, common)}
        if step is not None:
            text["a"] = decode(prompt + common, ga[at:])
            text["b"] = decode(prompt + common, gb[at:])
    tokens = {"a": ga, "b": gb, "a_token": ga[at], "b_token": gb[at]}
    return {"steps": n, "first_difference": step, **tokens, "text": text}


def run_diff(
    side_a: tuple[str, Side],
    side_b: tuple[str, Side],
    tokens: list[int],
    generate: int = 0,
    decode: Decode | None = None,
    precisions: tuple[str, str] | None = None,
) -> Report:
    """The whole report. With ``generate`` both sides decode greedily first, and the taps
    compared are those of the step where their tokens first differ (or of the last step), as
    each side chose its token there: a reference replays its cached greedy run up to that step;
    our backends, which trace one uncached forward, give that forward's taps of the common
    prefix and the logits their cached step drew from. (An uncached trace of the prefix alone
    rounds differently from cached steps: at a near-tie it can pick one token on both sides.)"""
    (name_a, a), (name_b, b) = side_a, side_b
    pa, pb = precisions or (a.dtype, b.dtype)  # a quantized folder: its bits (precision_of)
    if generate <= 0:
        return compare(a.trace(tokens), b.trace(tokens), name_a, name_b, pa, pb, tokens)
    generation = greedy_split(a, b, tokens, generate, decode)
    at = generation["first_difference"]
    prefix = generation["a"][: generate - 1 if at is None else at]
    ta, tb = a.step_taps(tokens, prefix), b.step_taps(tokens, prefix)
    report = compare(ta, tb, name_a, name_b, pa, pb, tokens + prefix)
    report.generation = generation
    return report


def plot_points(report: Report) -> dict[str, list[tuple[int, float]]]:
    """(x, relative error) per series: each per-layer tap kind at x = its layer, and the
    embeddings (x = -1), the final norm (n_layers) and the logits (n_layers + 1) as one series.
    Chosen experts are a fraction of tokens, not an error, and are left out."""
    n = 1 + max((t.layer for t in report.taps if t.layer is not None), default=-1)
    around = {"embeddings": -1, "norm": n, "logits": n + 1}
    series: dict[str, list[tuple[int, float]]] = {}
    for t in report.taps:
        if t.kind == "experts":
            continue
        if t.layer is not None:
            series.setdefault(t.kind, []).append((t.layer, t.rel))
        elif t.name in around:
            series.setdefault("embeddings, final norm, logits", []).append((around[t.name], t.rel))
    return series


def plot_title(report: Report) -> str:
    """Both sides, both folders when they differ, the verdict and the generation step."""
    lines = [f"a = {report.a}  vs  b = {report.b}"]
    if report.a_model != report.b_model:
        lines.append(f"a: {report.a_model}   b: {report.b_model}")
    verdict = "agree" if report.agree else f"first divergence: {report.first_divergence}"
    g = report.generation
    if g and g["first_difference"] is not None:
        verdict += f"; taps of generation step {g['first_difference']}, where the tokens split"
    elif g:
        verdict += f"; taps of the last of {g['steps']} greedy steps (the tokens never split)"
    return "\n".join([*lines, verdict])


def plot(report: Report, path: str) -> None:
    """Draws ``figure(report)`` to a PNG file."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits right of the axes
    plt.close(fig)


def figure(report: Report) -> Figure:
    """Relative error along the forward, one line per tap kind, log scale, tolerance dashed;
    an exact zero (which a log scale cannot show) is a triangle on the bottom edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in the axes
    zero_mark = {"ls": "none", "marker": "v", "ms": 6, "clip_on": False, "transform": bottom}
    zeros_seen = False
    for label, pts in plot_points(report).items():
        xs = [x for x, _ in pts]
        ys = [r if r > 0 else np.nan for _, r in pts]  # masked: a gap in the line
        model_level = label.startswith("embeddings")
        style = {"ls": "none", "marker": "s", "color": "black"} if model_level else {"marker": "o"}
        (line,) = ax.plot(xs, ys, ms=4, label=label, **style)
        if zeros := [x for x, r in pts if r == 0]:
            zeros_seen = True
            ax.plot(zeros, [0.0] * len(zeros), color=line.get_color(), **zero_mark)
    if zeros_seen:
        ax.plot([], [], ls="none", marker="v", color="grey", label="exactly 0 (on the bottom edge)")
    tol = max((t.tolerance for t in report.taps if t.kind != "experts"), default=None)
    if tol:
        ax.axhline(tol, ls="--", color="grey", lw=1, label=f"tolerance {tol:g} (relative)")
    ax.set_yscale("log")
    if not any(t.rel > 0 for t in report.taps if t.kind != "experts"):
        ax.set_ylim((tol or 1.0) * 1e-4, (tol or 1.0) * 10)  # nothing but zeros to show
    n = 1 + max((t.layer for t in report.taps if t.layer is not None), default=-1)
    every = max(1, n // 12)
    ticks = [-1, *range(0, n, every), n, n + 1]
    ax.set_xticks(ticks, ["emb", *(str(i) for i in range(0, n, every)), "norm", "logits"])
    ax.set_xlabel("layer")
    ax.set_ylabel("max |a - b| / max |a|")
    ax.set_title(plot_title(report), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, which="both", alpha=0.3)
    return fig
