"""Where two runs part ways: tap-by-tap errors, the first divergence, and how the error grows.

Each side is ``backend:device:dtype`` (``torch:cpu:float32``, ``mlx:gpu:bfloat16``) or an
outside reference, ``hf`` (transformers) or ``mlx-lm``, holding the same weights. Errors are
measured per tap as max |a - b| / max |a| (relative to the tap's scale) and judged against the
tolerance of the coarser dtype of the pair (TOLERANCE, calibrated on the embedded model; README).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from mistral.api import Model, from_tensors
from mistral.checkpoint import Checkpoint
from mistral.contract import REFERENCES, reference
from mistral.errors import MistralError
from mistral.taps import kind, layer

# Relative error allowed per tap, by the coarser dtype of the two sides.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
# Fraction of tokens whose chosen experts may differ (near-ties flip in half precision).
EXPERT_TOLERANCE = {"float32": 0.0, "float16": 0.05, "bfloat16": 0.1}
COARSENESS = ["float32", "float16", "bfloat16"]


class Side(Protocol):
    """One side of a diff: one of our backends (OurSide) or an outside reference."""

    device: str
    dtype: str

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]: ...

    def greedy(self, prompt: list[int], n: int) -> list[int]: ...


class OurSide:
    """One of our backends, seen through the same two calls as a reference."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.device, self.dtype = model.device, model.dtype

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        return self.model.trace(tokens)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.model.generate([prompt], n)[0]


def load_side(spec: str, ckpt: Checkpoint) -> tuple[str, Side]:
    """'torch:cpu:float32' -> ('torch:cpu:float32', side); device and dtype may be left out."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise MistralError(f"side {spec!r}: expected backend[:device[:dtype]]")
    backend, device, dtype = [*parts, None, None][:3]
    device, dtype = device or None, dtype or None
    side: Side
    if backend in REFERENCES:
        side = reference(backend, ckpt.args, ckpt.tensors, device, dtype)
    else:
        side = OurSide(
            from_tensors(ckpt.args, ckpt.tensors, backend, device, dtype, str(ckpt.path))
        )
    return f"{backend}:{side.device}:{side.dtype}", side


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
        lines = [f"a = {self.a}", f"b = {self.b}", f"{len(self.tokens)} tokens", ""]
        lines.append(f"{'tap':<28}{'max |a-b|':>12}{'rel err':>12}{'cosine':>12}{'tol':>10}")
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
            g = self.generation
            if g["first_difference"] is None:
                lines.append(f"generation: {g['steps']} greedy tokens, identical on both sides")
            else:
                where = f"step {g['first_difference']} ({g['a_token']} vs {g['b_token']})"
                lines.append(f"generation: tokens differ first at {where}; taps above are there")
        return "\n".join(lines)


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


def run_diff(
    side_a: tuple[str, Side], side_b: tuple[str, Side], tokens: list[int], generate: int = 0
) -> Report:
    """The whole report; with ``generate`` both sides decode greedily first and the taps are
    compared at the first step where their tokens differ (or at the last step)."""
    (name_a, a), (name_b, b) = side_a, side_b
    generation = None
    if generate > 0:
        ga, gb = a.greedy(tokens, generate), b.greedy(tokens, generate)
        step = next((i for i, (x, y) in enumerate(zip(ga, gb, strict=True)) if x != y), None)
        at = step if step is not None else generate - 1
        generation = {
            "steps": generate,
            "first_difference": step,
            "a": ga,
            "b": gb,
            "a_token": ga[at],
            "b_token": gb[at],
        }
        tokens = tokens + ga[:at]  # the sequence whose last position chose the differing token
    ta, tb = a.trace(tokens), b.trace(tokens)
    if generation:
        ta = {k: v[-1:] for k, v in ta.items()}
        tb = {k: v[-1:] for k, v in tb.items()}
    report = compare(ta, tb, name_a, name_b, a.dtype, b.dtype, tokens)
    report.generation = generation
    return report


def plot(report: Report, path: str) -> None:
    """Relative error per layer, one line per tap kind, log scale, tolerance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    # Per-layer kinds; chosen experts are a fraction of tokens, not an error, and are left out.
    kinds = [
        k
        for k in dict.fromkeys(t.kind for t in report.taps if t.layer is not None)
        if k != "experts"
    ]
    floor = 1e-12
    for k in kinds:
        pts = [(t.layer, max(t.rel, floor)) for t in report.taps if t.kind == k]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k)
    tol = max((t.tolerance for t in report.taps if t.kind != "experts"), default=None)
    if tol:
        ax.axhline(tol, ls="--", color="grey", lw=1, label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("max |a - b| / max |a|")
    verdict = "agree" if report.agree else f"first divergence: {report.first_divergence}"
    ax.set_title(f"{report.a} vs {report.b} ({verdict})", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
