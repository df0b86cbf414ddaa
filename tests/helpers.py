"""Shared test helpers: tiny configs, seeded Hugging Face reference models, folders on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from mistral.args import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "mistral" / "configs"  # mistral.checkpoint.CONFIGS


def run_cli(*argv: str, code: str = "") -> subprocess.CompletedProcess:
    """``mistral ARGV`` in a fresh interpreter from the repository root, after ``code`` (e.g. a
    patch that plants a failure); its output captured."""
    script = code + "\nimport sys, mistral.cli\nsys.exit(mistral.cli.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, check=False
    )


def tiny(name: str) -> ModelArgs:
    """A config from configs/ (tiny-dense, tiny-window, tiny-moe, ...)."""
    return ModelArgs.from_file(CONFIGS / f"{name}.json")


def random_rows(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over rows of logits, which must have equal shapes."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def hf_model(args: ModelArgs, seed: int = 0):
    """A float32 Mistral/MixtralForCausalLM with seeded weights large enough to matter."""
    import torch
    import transformers

    from mistral import hf_config

    config = hf_config.config_from_args(args, "float32")
    if args.moe:
        cls, cfg_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
    else:
        cls, cfg_cls = transformers.MistralForCausalLM, transformers.MistralConfig
    cfg = cfg_cls(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return seeded(cls(cfg), seed)


def seeded(model, seed: int = 0):
    """A transformers model's weights drawn again, seeded, large enough to matter: norms near 1,
    the rest of unit variance over fan-in; in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def hf_logits(model, rows: list[list[int]]) -> list[np.ndarray]:
    """One uncached HF forward per row, float32 logits (T, V)."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Hugging Face's own cached greedy generation, never stopping at EOS.

    (min_new_tokens would not do: it hides EOS from the argmax instead of letting it through.)
    """
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def hf_to_mistral_folder(hf_dir: Path, out: Path) -> Path:
    """Reads an HF folder with our reader (un-permuting wq/wk) and writes Mistral's layout."""
    from mistral.checkpoint import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(hf_dir)
    write_checkpoint(out, "mistral", ckpt.args, ckpt.tensors)
    return out


def mlx_lm_model(args: ModelArgs, tensors: dict):
    """mlx-lm's own Mistral (llama) or Mixtral model holding the same weights, in float32.

    mlx-lm reads Hugging Face's layout, so the weights go through our HF conversion (wq/wk rows
    permuted into half order, which mlx-lm rotates with traditional=False).
    """
    import mlx.core as mx

    from mistral import hf, hf_config

    config = hf_config.config_from_args(args, "float32")
    if args.moe:
        from mlx_lm.models import mixtral as family
    else:
        from mlx_lm.models import llama as family
    model = family.Model(family.ModelArgs.from_dict(config))
    weights = {k: mx.array(t.to_numpy()) for k, t in hf.tensors_to_hf(args, tensors).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def mlx_lm_logits(model, rows: list[list[int]]) -> list[np.ndarray]:
    """One uncached mlx-lm forward per row, float32 logits (T, V)."""
    import mlx.core as mx

    return [np.array(model(mx.array([r]))[0].astype(mx.float32)) for r in rows]


def mistral_common_file(name: str) -> Path:
    """A real Mistral tokenizer shipped inside mistral-common (v1: tokenizer.model.v1, v3:
    mistral_instruct_tokenizer_240323.model.v3)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


V1 = "tokenizer.model.v1"
V3 = "mistral_instruct_tokenizer_240323.model.v3"
V2 = "mistral_instruct_tokenizer_240216.model.v2"
V7 = "mistral_instruct_tokenizer_241114.model.v7"
V7M1 = "mistral_instruct_tokenizer_241114.model.v7m1"
TEKKEN = "tekken_240718.json"  # Nemo's, v3
TEKKEN_MM = "tekken_240911.json"  # Pixtral's, v3 with an image config
SHIPPED = [V1, V2, V3, V7, V7M1, TEKKEN, TEKKEN_MM]  # every tokenizer file mistral-common ships


def tekken_as(version: str, dest: Path) -> Path:
    """Nemo's tekken file declared as ``version`` with its special tokens listed, as the files of
    v7 and later list them ([ARGS] 32, [CALL_ID] 33, [THINK] 34, [/THINK] 35): mistral-common
    ships no v7, v11 or v13 tekken file but builds those formats on any tekken file that has the
    tokens."""
    import json

    from mistral.tekken import OLD_SPECIAL_TOKENS

    data = json.loads(mistral_common_file(TEKKEN).read_text())
    names = [*OLD_SPECIAL_TOKENS, *(f"<SPECIAL_{i}>" for i in range(20, 32))]
    names += ["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]
    data["special_tokens"] = [
        {"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)
    ]
    data["config"]["version"] = version
    dest.write_text(json.dumps(data))
    return dest


def assert_compiled_agrees(eager, compiled, rows: list[list[int]], n: int) -> None:
    """A compiled model against its eager twin: ``n`` greedy tokens in one graph (no graph
    break), the same tokens, and logits to float32 rounding (1e-5)."""
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    tokens = compiled.generate(rows, n)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert tokens == eager.generate(rows, n)
    full = [r + t for r, t in zip(rows, tokens, strict=True)]
    assert max_diff(compiled.logits(full, chunk_size=1), eager.logits(full, chunk_size=1)) <= 1e-5
