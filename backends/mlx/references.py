"""mlx-lm as an outside reference for ``mistral diff``: its taps and its greedy run.

mlx-lm's Mistral (its llama model) applies a sliding window only to layers listed in layer_types and
needs at least one full-attention layer, so it attends past Mistral's window; diffs say so.
Ministral 8B (transformers' ministral, which mlx-lm lacks) runs on its llama with the layer_types;
Ministral 3 on its ministral3, Mixtral on its mixtral.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.mlx.measure import Meter
from backends.mlx.runner import dtype_name, resolve_device, resolve_dtype
from mistral import hf
from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.hf import halves_to_pairs
from mistral.measure import Timing, timed_run
from mistral.taps import chosen_experts
from mistral.weights import RawTensor


class RopeRecorder(nn.Module):
    """Wraps mlx-lm's rope module to keep what it returns (queries, then keys)."""

    def __init__(self, rope: nn.Module, seen: list) -> None:
        super().__init__()
        self.rope = rope
        self.seen = seen

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        y = self.rope(x, offset=offset)
        self.seen.append(y)
        return y


class MlxLmReference:
    """mlx-lm's own model (llama for Mistral, mixtral) holding the same weights."""

    def __init__(
        self,
        args: ModelArgs,
        tensors: Mapping[str, RawTensor],
        device: str | None,
        dtype: str | None,
    ) -> None:
        config = hf.config_from_args(args, dtype_name(resolve_dtype(dtype, resolve_device(device))))
        kind = {"mistral": "llama", "ministral": "llama"}.get(config["model_type"])
        try:
            family = importlib.import_module(f"mlx_lm.models.{kind or config['model_type']}")
        except ImportError:
            raise MistralError("the mlx-lm reference needs mlx-lm: pip install mlx-lm") from None
        self.args = args
        self.scaled = config["model_type"] == "ministral3"  # its attention takes query scales
        self.rope_parameters = config.get("rope_parameters", {})
        self.window = config["sliding_window"]  # of the layers mlx-lm windows (layer_types)
        self.mx_device = resolve_device(device)
        dt = resolve_dtype(dtype, self.mx_device)
        self.device = "gpu" if self.mx_device == mx.gpu else "cpu"
        self.dtype = dtype_name(dt)
        self.meter = Meter(args, device, dtype)
        self.model = family.Model(family.ModelArgs.from_dict(config))
        weights = {
            k: mx.array(t.to_numpy()).astype(dt) for k, t in hf.tensors_to_hf(args, tensors).items()
        }
        self.model.load_weights(list(self.model.sanitize(weights).items()), strict=True)
        mx.eval(self.model.parameters())

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        from mlx_lm.models.base import create_attention_mask

        taps: dict[str, mx.array] = {}
        inner = self.model.model
        with mx.stream(self.mx_device):
            h = inner.embed_tokens(mx.array([tokens]))
            taps["embeddings"] = h
            masks = {
                False: create_attention_mask(h, None),
                True: create_attention_mask(h, None, window_size=self.window),
            }
            scales = []  # ministral3: the queries' scale by position, as its model computes it
            if self.scaled:
                r = self.rope_parameters
                beta, period = r["llama_4_scaling_beta"], r["original_max_position_embeddings"]
                positions = mx.arange(len(tokens))
                scale = 1 + beta * mx.log(1 + mx.floor(positions / period))
                scales = [scale[:, None].astype(h.dtype)]
            for i, layer in enumerate(inner.layers):
                p = f"layers.{i}."
                seen: list[mx.array] = []
                rope = layer.self_attn.rope
                layer.self_attn.rope = RopeRecorder(rope, seen)
                mask = masks[bool(getattr(layer, "use_sliding", False))]
                try:
                    x = taps[p + "attention_norm"] = layer.input_layernorm(h)
                    r = taps[p + "attention"] = layer.self_attn(x, *scales, mask)
                finally:
                    layer.self_attn.rope = rope
                taps[p + "q"], taps[p + "k"] = seen[0], seen[1]
                h = h + r
                x = taps[p + "ffn_norm"] = layer.post_attention_layernorm(h)
                if self.args.moe:
                    moe = layer.block_sparse_moe
                    taps[p + "router_logits"] = moe.gate(x)
                    ff = moe(x)
                else:
                    ff = layer.mlp(x)
                taps[p + "feed_forward"] = ff
                h = taps[p + "residual"] = h + ff
            taps["norm"] = inner.norm(h)
            if self.args.tied_embeddings:
                taps["logits"] = inner.embed_tokens.as_linear(taps["norm"])
            else:
                taps["logits"] = self.model.lm_head(taps["norm"])
            mx.eval(taps)
        out = {k: np.array(v.astype(mx.float32))[0] for k, v in taps.items()}
        for i in range(self.args.n_layers):
            for name in ("q", "k"):  # (H, T, D) in half order -> (T, H, D) in pair order
                out[f"layers.{i}.{name}"] = halves_to_pairs(
                    out[f"layers.{i}.{name}"].transpose(1, 0, 2)
                )
            if self.args.moe:
                r = out[f"layers.{i}.router_logits"]
                k = self.args.moe.num_experts_per_tok
                out[f"layers.{i}.experts"] = chosen_experts(r, k)
        return out

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        out: list[int] = []
        x = mx.array([prompt])
        with mx.stream(self.mx_device):
            for _ in range(n):
                logits = self.model(x, cache=cache)[0, -1]
                token = int(mx.argmax(logits.astype(mx.float32)).item())
                out.append(token)
                x = mx.array([[token]])
        return out

    def timed(self, prompts: list[list[int]], gen_len: int) -> Callable[[], Timing]:
        """A timed greedy run through mlx-lm's own cache (equal-length prompts)."""
        from mlx_lm.models.cache import make_prompt_cache

        def run() -> Timing:
            cache = make_prompt_cache(self.model)
            state = {}

            def prefill() -> None:
                logits = self.model(mx.array(prompts), cache=cache)
                state["token"] = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
                mx.eval(state["token"])

            def decode() -> None:
                for _ in range(gen_len - 1):
                    logits = self.model(state["token"], cache=cache)
                    state["token"] = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
                    mx.eval(state["token"])

            with mx.stream(self.mx_device):
                return timed_run(self.meter, prefill, decode)

        return run
