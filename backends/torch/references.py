"""Hugging Face transformers as an outside reference for ``mistral diff``: taps and greedy runs."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import tempfile
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from backends.torch.measure import Meter
from backends.torch.runner import dtype_name, resolve_device, resolve_dtype
from mistral import hf_config
from mistral.args import ModelArgs
from mistral.checkpoint import write_checkpoint
from mistral.errors import MistralError
from mistral.hf import halves_to_pairs
from mistral.measure import Timing, timed_run
from mistral.taps import chosen_experts, kind
from mistral.weights import RawTensor

# The function each family rotates q and k with, and the order its output is in: latent
# attention rotates only the RoPE part, DeepSeek-V2 as complex pairs, the others into halves.
ROTARY = {
    "deepseek_v2": ("apply_rotary_emb", "pairs"),
    "deepseek_v3": ("apply_rotary_pos_emb_interleave", "halves"),
    "mistral4": ("apply_rotary_pos_emb_interleave", "halves"),
}


class HFReference:
    """transformers' model of the family (mistral, mixtral, ministral, ministral3, deepseek_v2,
    deepseek_v3, mistral4) holding the same weights, loaded by transformers."""

    def __init__(
        self,
        args: ModelArgs,
        tensors: Mapping[str, RawTensor],
        device: str | None,
        dtype: str | None,
    ) -> None:
        try:
            import transformers
        except ImportError:
            raise MistralError(
                "the hf reference needs transformers: pip install transformers (or '.[hf]')"
            ) from None
        self.args = args
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        self.device, self.dtype = str(dev), dtype_name(dt)
        self.meter = Meter(args, device, dtype)
        family = hf_config.model_type(args)
        cls = getattr(transformers, hf_config.CLASSES[family])
        self.rotary, self.rotary_order = ROTARY.get(family, ("apply_rotary_pos_emb", "halves"))
        with tempfile.TemporaryDirectory() as tmp:  # transformers' own loader does its conversions
            write_checkpoint(tmp, "hf", args, dict(tensors))
            model = cls.from_pretrained(tmp, dtype=dt)  # its default attention (sdpa)
        self.model = model.to(dev).eval()
        self.modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        # transformers 5.24 calls the cache `cache` (`past_key_values` before, deprecated there)
        names = inspect.signature(self.model.forward).parameters
        self.cache_key = "cache" if "cache" in names else "past_key_values"

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Records the taps of the forwards run inside it (transformers' layout: (1, T, ...),
        q and k as (1, H, T, D) in half order), through hooks and its rotary function."""
        taps: dict[str, torch.Tensor] = {}
        inner = self.model.model

        def record(name: str) -> Callable:
            def hook(module, inputs, output) -> None:
                taps[name] = output[0] if isinstance(output, tuple) else output
                if isinstance(output, tuple) and len(output) == 3:  # DeepSeek's router
                    taps[name.replace("router_logits", "chosen")] = output[2]

            return hook

        modules = [("embeddings", inner.embed_tokens), ("norm", inner.norm)]
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            modules += [
                (p + "attention_norm", layer.input_layernorm),
                (p + "attention", layer.self_attn),
                (p + "ffn_norm", layer.post_attention_layernorm),
                (p + "feed_forward", layer.mlp),
                (p + "residual", layer),
            ]
            if self.args.moe_layer(i):
                modules.append((p + "router_logits", layer.mlp.gate))
        hooks = [m.register_forward_hook(record(name)) for name, m in modules]
        original, calls = getattr(self.modeling, self.rotary), iter(range(self.args.n_layers))

        def rope(*a, **kw):
            q, k = original(*a, **kw)
            i = next(calls)
            taps[f"layers.{i}.q"], taps[f"layers.{i}.k"] = q, k
            return q, k

        setattr(self.modeling, self.rotary, rope)
        try:
            yield taps
        finally:
            setattr(self.modeling, self.rotary, original)
            for h in hooks:
                h.remove()

    def as_taps(self, taps: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Recorded taps and (1, T, V) logits in mistral.taps' layout, float32 (T, ...)."""
        out = {}
        for name, t in taps.items():
            a = t.float().cpu().numpy()
            if kind(name) in ("q", "k"):  # (1, H, T, D) -> (T, H, D) in pair order
                a = a[0].transpose(1, 0, 2)
                out[name] = halves_to_pairs(a) if self.rotary_order == "halves" else a
            else:  # the router's logits come as (T, E), the rest as (1, T, ...)
                out[name] = a[0] if a.ndim == 3 else a
        for i in range(self.args.n_layers):
            if not self.args.moe_layer(i):
                continue
            chosen = out.pop(f"layers.{i}.chosen", None)  # as the router chose (groups, bias)
            r = out[f"layers.{i}.router_logits"]
            k = self.args.moe.num_experts_per_tok  # type: ignore[union-attr]
            out[f"layers.{i}.experts"] = (
                chosen_experts(r, k) if chosen is None else np.sort(chosen.astype(np.int64), -1)
            )
        out["logits"] = logits[0].float().cpu().numpy()
        return out

    @torch.inference_mode()
    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        with self.recording() as taps:
            logits = self.model(torch.tensor([tokens], device=self.model.device)).logits
        return self.as_taps(taps, logits)

    @torch.inference_mode()
    def step(self, tokens: list[int], cache: object | None) -> tuple[torch.Tensor, object]:
        """One forward of a greedy run through transformers' own cache: (1, T, V) logits and the
        cache (a new one when ``cache`` is None)."""
        x = torch.tensor([tokens], device=self.model.device)
        out = self.model(x, use_cache=True, **{self.cache_key: cache})
        return out.logits, getattr(out, self.cache_key)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Greedy tokens, one forward per token through the cache, as ``step_taps`` replays it."""
        logits, cache = self.step(prompt, None)
        out = [int(logits[0, -1].argmax())]
        while len(out) < n:
            logits, cache = self.step(out[-1:], cache)
            out.append(int(logits[0, -1].argmax()))
        return out

    @torch.inference_mode()
    def step_taps(self, prompt: list[int], tokens: list[int]) -> dict[str, np.ndarray]:
        """The taps (1, ...) of the greedy step that chose the token after prompt + tokens,
        computed as ``greedy`` computed it: the earlier steps fill the cache first."""
        feed, cache = prompt, None
        for t in tokens:
            _, cache = self.step(feed, cache)
            feed = [t]
        with self.recording() as taps:
            logits, _ = self.step(feed, cache)
        return {name: a[-1:] for name, a in self.as_taps(taps, logits).items()}

    def timed(
        self, prompts: list[list[int]], gen_len: int, on_step: Callable[[], None] | None = None
    ) -> Callable[[], Timing]:
        """A timed greedy run through transformers' own cache (equal-length prompts);
        ``on_step`` is called as each step's tokens reach the host, the first token's too."""
        tick = on_step or (lambda: None)

        @torch.inference_mode()
        def run() -> Timing:
            state = {}

            def advance(x: torch.Tensor, cache: object | None) -> None:
                out = self.model(x, use_cache=True, **{self.cache_key: cache})
                state["cache"] = getattr(out, self.cache_key)
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["token"].cpu()  # our loop, too, sees every step's logits on the host
                tick()

            def prefill() -> None:
                advance(torch.tensor(prompts, device=self.model.device), None)

            def decode() -> None:
                for _ in range(gen_len - 1):
                    advance(state["token"], state["cache"])

            return timed_run(self.meter, prefill, decode)

        return run
