"""Models by name: a repo id resolved through the cache huggingface_hub keeps, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from mistral.checkpoint import write_checkpoint
from mistral.hub import is_repo_id, wanted
from mistral.weights import random_weights
from tests.helpers import ROOT, tiny
from tests.test_cli import run as run_cli


def hub_cache(root, repo: str, folder) -> str:
    """Lays ``folder`` out as huggingface_hub does: blobs by hash, a snapshot of links into
    them, refs/main naming the snapshot."""
    base = root / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = base / "snapshots" / revision
    (base / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, base / "blobs" / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    return revision


def run(argv: list[str], cache) -> subprocess.CompletedProcess:
    """The command with the hub offline and this cache (tests.test_cli.run with its env)."""
    return run_cli(*argv, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The embedded model's bytes under a repo id, in a cache folder of its own."""
    root = tmp_path_factory.mktemp("hub")
    hub_cache(root, "someone/tiny-bible", ROOT / "mistral" / "default_model")
    args = tiny("tiny-dense")
    hf_folder = tmp_path_factory.mktemp("hf")
    write_checkpoint(hf_folder, "hf", args, random_weights(args))
    hub_cache(root, "someone/tiny-hf", hf_folder)
    return root


def test_a_repo_id_loads_from_the_cache_offline(cache):
    out = run(
        ["generate", "--model", "someone/tiny-bible", "--prompt", "And", "--max-tokens", "5"], cache
    )
    assert out.returncode == 0, out.stderr
    local = run(["generate", "--prompt", "And", "--max-tokens", "5"], cache)
    assert out.stdout == local.stdout  # the same model, the same greedy text
    info = run(["info", "someone/tiny-hf"], cache)
    assert info.returncode == 0 and "(hf format)" in info.stdout, info.stderr
    assert "/snapshots/0123456789abcdef" in info.stdout


def test_a_repo_at_a_revision_and_one_not_cached(cache):
    rev = run(["info", "someone/tiny-hf@0123456789abcdef0123456789abcdef01234567"], cache)
    assert rev.returncode == 0, rev.stderr
    out = run(["info", "someone/absent"], cache)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not in the local Hugging Face cache" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_python_api_takes_a_repo_id(cache, monkeypatch):
    code = (
        "import mistral; m = mistral.load('someone/tiny-bible', device='cpu');"
        "print(m.tokenizer is not None, m.args.n_layers)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    assert out.returncode == 0 and out.stdout.split() == ["True", "4"], out.stderr


def test_what_reads_as_a_repo_id():
    assert is_repo_id("mistralai/Mistral-7B-Instruct-v0.3")
    assert is_repo_id("org/name@main")
    assert not is_repo_id(str(ROOT / "mistral" / "default_model"))  # a folder that exists
    assert not is_repo_id("a/b/c") and not is_repo_id("plain")


def test_one_layout_is_downloaded_not_both():
    both = [
        "params.json",
        "consolidated.safetensors",
        "config.json",
        "model-00001-of-00002.safetensors",
    ]
    assert "params.json" in wanted(both) and "config.json" not in wanted(both)
    assert "config.json" in wanted(["config.json", "model.safetensors", "tokenizer.json"])
