"""The seams: who imports whom, the backend contract, and the twin files."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import subprocess
import sys
import zipfile

import pytest

import mistral
from mistral import contract
from mistral.cache import CacheBook
from mistral.weights import random_weights
from tests.helpers import ROOT, max_diff, random_rows, tiny

PACKAGES = ("mistral", "backends")


def imports_of(path, modules) -> set[str]:
    """The project modules a file imports when it runs (functions' imports included; imports
    only for type checkers, under ``if TYPE_CHECKING``, left out). ``from package import module``
    counts as importing the module. (Python also runs a package's __init__ before any of its
    modules; mistral/__init__ imports the API, which is why it may import no backend.)"""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out & set(modules)


def module_graph() -> dict[str, set[str]]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    return {name: imports_of(path, files) - {name} for name, path in files.items()}


def test_no_import_cycle_at_run_time():
    graph = module_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_backends_sit_below_the_tools_and_the_api():
    """Backends use the spec (args, cache plans, weights, taps, measurement), never the tools or
    the API built on top of them; mistral/ reaches a backend only through mistral.contract."""
    graph = module_graph()
    above = {"mistral.bench", "mistral.diff", "mistral.api", "mistral.chat", "mistral.generate"}
    for name, deps in graph.items():
        if name.startswith("backends"):
            assert not deps & above, (name, deps & above)
            assert not any(d.startswith("mistral.cli") for d in deps), name
        else:
            assert not any(d.startswith("backends") for d in deps), (name, deps)


@pytest.mark.parametrize("name", contract.BACKENDS)
def test_each_backend_provides_the_contract(name):
    backend = contract.backend(name)
    for call in ("build", "meter", "reference"):
        want = inspect.signature(getattr(contract.Backend, call)).parameters
        have = inspect.signature(getattr(backend, call)).parameters
        assert list(have) == [p for p in want if p != "self"], (name, call)
    args = tiny("tiny-moe")
    model = mistral.from_tensors(args, random_weights(args), backend=name, device="cpu")
    assert isinstance(model.runner, contract.Runner)
    meter = backend.meter(args, "cpu", None)
    assert (meter.device, meter.dtype) == (model.device, model.dtype)


def test_the_planner_alone_decides_who_sees_whom():
    """A planner told a narrower window than the model's: both backends must follow the plan
    (and so match a model built with that window), never a rule of their own."""
    args = tiny("tiny-window")
    narrow = args.sliding_window - 3

    class NarrowBook(CacheBook):
        def __init__(self, batch: int, size: int, window: int | None) -> None:
            super().__init__(batch, size, narrow)

    weights = random_weights(args, seed=5)
    rows = random_rows([40, 9], args.vocab_size, 3)
    narrowed = dataclasses.replace(args, sliding_window=narrow)
    for name in contract.BACKENDS:
        expected = mistral.from_tensors(narrowed, weights, name, "cpu").logits(rows, chunk_size=6)
        model = mistral.from_tensors(args, weights, name, "cpu")
        assert max_diff(model.logits(rows, chunk_size=6), expected) > 1e-3  # the windows differ
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mistral.cache, "CacheBook", NarrowBook)
            assert max_diff(model.logits(rows, chunk_size=6), expected) <= 1e-5, name


def test_layers_may_attend_over_different_windows(monkeypatch):
    """Room for per-layer attention kinds: with sliding and full layers interleaved, each layer
    follows its own window's plan and buffer (one CacheBook per window), cached and chunked runs
    equal the uncached trace, and both backends agree."""
    args = tiny("tiny-window")
    W = args.sliding_window
    weights = random_weights(args, seed=6)
    rows = random_rows([2 * W + 5, 9], args.vocab_size, 4)
    uniform = {
        w: mistral.from_tensors(dataclasses.replace(args, sliding_window=w), weights).logits(rows)
        for w in (W, None)
    }
    windows = [W if i % 2 == 0 else None for i in range(args.n_layers)]
    monkeypatch.setattr(mistral.ModelArgs, "layer_windows", lambda self: windows)
    out = {}
    for name in contract.BACKENDS:
        model = mistral.from_tensors(args, weights, name, "cpu")
        out[name] = model.logits(rows, chunk_size=7)
        uncached = [model.trace(r)["logits"] for r in rows]
        assert max_diff(out[name], uncached) <= 1e-5, name
        assert {layer.window for layer in model.runner.model.layers} == {W, None}
    assert max_diff(out["torch"], out["mlx"]) <= 1e-4
    assert min(max_diff(out["torch"], u) for u in uniform.values()) > 1e-3


def shared_lines(a: str, b: str) -> float:
    x, y = a.splitlines(), b.splitlines()
    same = sum(
        m.size for m in difflib.SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks()
    )
    return 2 * same / (len(x) + len(y))


def structure(source: str) -> list[str]:
    """Class and method names, and attribute names assigned in methods, in order."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            out.append(node.name.replace("__call__", "forward"))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.append(node.attr)
    return out


@pytest.mark.parametrize(
    "name, threshold, same_structure",
    [("model.py", 0.71, True), ("cache.py", 0.70, True), ("runner.py", 0.50, False)],
)
def test_backend_files_stay_twins(name, threshold, same_structure):
    """Thresholds taken from the files as written: 71% and 70% of lines identical for the model
    and cache files, 50% for the runners (39% for the runtime files they replaced)."""
    torch_src = (ROOT / "backends" / "torch" / name).read_text()
    mlx_src = (ROOT / "backends" / "mlx" / name).read_text()
    assert shared_lines(torch_src, mlx_src) >= threshold
    if same_structure:
        assert structure(torch_src) == structure(mlx_src)


def test_bench_finds_its_configs_from_a_wheel(tmp_path):
    """configs/ ships inside the package: `mistral bench --config NAME` works from a wheel."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("*.whl")
    assert "mistral/configs/tiny-dense.json" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    bench = [
        "--config",
        "tiny-dense",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--repeats",
        "1",
        "--device",
        "cpu",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "mistral", "bench", *bench],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "tiny-dense (random weights)" in out.stdout
