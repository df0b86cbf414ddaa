"""mlx-lm as an outside reference for ``mistral diff``: its taps and its greedy run.

mlx-lm's Mistral (its llama model) applies a sliding window only to layers listed in layer_types and
needs at least one full-attention layer, so it attends past Mistral's window; diffs say so.
Ministral 8B (transformers' ministral, which mlx-lm lacks) runs on its llama with the layer_types;
Ministral 3 on its ministral3, Mixtral on its mixtral, the latent families on its deepseek_v2,
deepseek_v3 and mistral4 (whose routers return the chosen experts, not the logits: those are
the gate's product of its input, computed here from its weight).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.mlx.measure import Meter
from backends.mlx.quantized import arrays
from backends.mlx.runner import dtype_name, from_raw, resolve_device, resolve_dtype
from mistral import hf, hf_config
from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.hf import halves_to_pairs
from mistral.measure import Timing, timed_run
from mistral.quant import Quantization, QuantizedTensor
from mistral.taps import chosen_experts
from mistral.weights import RawTensor


class Tapped(nn.Module):
    """Wraps one of mlx-lm's modules to hand what it is given (its first argument) and what it
    returns to ``keep``, by tap name (None: not kept)."""

    def __init__(
        self,
        module: nn.Module,
        keep: Callable[[str, mx.array], None],
        given: str | None,
        returns: str | None,
    ) -> None:
        super().__init__()
        self.module = module
        self.keep, self.given, self.returns = keep, given, returns

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if self.given is not None:
            self.keep(self.given, x)
        y = self.module(x, *args, **kwargs)
        if self.returns is not None:
            self.keep(self.returns, y)
        return y


def quantized_as(layers: dict[str, Quantization], path: str) -> dict | bool:
    """nn.quantize's choice for a module: its weight's quantization, or none."""
    q = layers.get(path)
    return False if q is None else {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}


class MlxLmReference:
    """mlx-lm's own model (llama for Mistral, mixtral) holding the same weights."""

    def __init__(
        self,
        args: ModelArgs,
        tensors: Mapping[str, RawTensor],
        device: str | None,
        dtype: str | None,
    ) -> None:
        config = hf_config.config_from_args(
            args, dtype_name(resolve_dtype(dtype, resolve_device(device)))
        )
        kind = {"mistral": "llama", "ministral": "llama"}.get(config["model_type"])
        if config["model_type"] == "deepseek_v2":  # its deepseek_v2 reads rope_scaling, a YaRN
            if args.yarn is None:
                raise MistralError("mlx-lm's deepseek_v2 runs only with YaRN RoPE")
            config["rope_scaling"] = config["rope_parameters"]
        try:
            family = importlib.import_module(f"mlx_lm.models.{kind or config['model_type']}")
        except ImportError:
            raise MistralError(
                "the mlx-lm reference needs mlx-lm: pip install mlx-lm (or '.[mlx-lm]')"
            ) from None
        self.family = family
        self.args = args
        self.mx_device = resolve_device(device)
        dt = resolve_dtype(dtype, self.mx_device)
        self.device = "gpu" if self.mx_device == mx.gpu else "cpu"
        self.dtype = dtype_name(dt)
        self.meter = Meter(args, device, dtype)
        self.model = family.Model(family.ModelArgs.from_dict(config))
        weights, layers = {}, {}
        for name, t in hf.tensors_to_hf(args, tensors).items():
            if isinstance(t, QuantizedTensor):  # as mlx-lm's load: its layers quantized first
                layers[name.removesuffix(".weight")] = t.q
                weights |= arrays(name, t, dt, from_raw)
            else:
                weights[name] = mx.array(t.to_numpy()).astype(dt)
        if layers:
            nn.quantize(self.model, class_predicate=lambda path, _: quantized_as(layers, path))
        self.model.load_weights(list(self.model.sanitize(weights).items()), strict=True)
        mx.eval(self.model.parameters())

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, mx.array]]:
        """Records the taps of the forwards of mlx-lm's own model run inside it, cached or not:
        its modules are wrapped (Tapped) while it lasts. A block's input is the residual stream
        (the embeddings at layer 0), the final norm's input the last residual."""
        taps: dict[str, mx.array] = {}

        def keep(name: str, x: mx.array) -> None:
            if name.endswith(".rope"):  # rope is applied to the queries, then to the keys
                name = name[: -len("rope")] + ("k" if name[: -len("rope")] + "q" in taps else "q")
            taps[name] = x

        swaps: list[tuple[nn.Module, str, nn.Module]] = []

        def wrap(owner: nn.Module, attr: str, given: str | None, returns: str | None) -> None:
            swaps.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, Tapped(getattr(owner, attr), keep, given, returns))

        inner = self.model.model
        ffn = "block_sparse_moe" if self.args.moe and not self.args.mla else "mlp"
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            wrap(layer.self_attn, "rope", None, p + "rope")
            wrap(layer, "self_attn", None, p + "attention")
            before = f"layers.{i - 1}.residual" if i else "embeddings"
            wrap(layer, "input_layernorm", before, p + "attention_norm")
            wrap(layer, "post_attention_layernorm", None, p + "ffn_norm")
            if self.args.moe_layer(i):  # DeepSeek's gates return (chosen, weights)
                routes = not isinstance(getattr(layer, ffn).gate, nn.Linear)
                wrap(
                    getattr(layer, ffn), "gate", None, p + ("chosen" if routes else "router_logits")
                )
            wrap(layer, ffn, None, p + "feed_forward")
        wrap(inner, "norm", f"layers.{len(inner.layers) - 1}.residual", "norm")
        selects: list[mx.array] = []  # mistral4's gate gives logits, its select the experts
        select = getattr(self.family, "mistral4_expert_select", None)
        if select is not None:

            def recorded(*a: Any) -> Any:
                chosen, weights = select(*a)
                selects.append(chosen)
                return chosen, weights

            self.family.mistral4_expert_select = recorded
        try:
            yield taps
        finally:
            for owner, attr, original in reversed(swaps):
                setattr(owner, attr, original)
            if select is not None:
                self.family.mistral4_expert_select = select
            moe_layers = [i for i in range(self.args.n_layers) if self.args.moe_layer(i)]
            for i, chosen in zip(moe_layers, selects, strict=False):
                taps[f"layers.{i}.chosen"] = chosen

    def as_taps(self, taps: dict[str, mx.array], logits: mx.array) -> dict[str, np.ndarray]:
        """Recorded taps and (1, T, V) logits in mistral.taps' layout, float32 (T, ...)."""
        taps = {k: v[0] if isinstance(v, tuple) else v for k, v in taps.items()}  # (chosen, w)
        mx.eval(taps, logits)
        out = {k: np.array(v.astype(mx.float32))[0] for k, v in taps.items()}
        for i in range(self.args.n_layers):
            for name in ("q", "k"):  # (H, T, D) -> (T, H, D); latent attention's in pair order
                a = out[f"layers.{i}.{name}"].transpose(1, 0, 2)
                out[f"layers.{i}.{name}"] = a if self.args.mla else halves_to_pairs(a)
            if self.args.moe_layer(i):
                self.routing_taps(out, i)
        out["logits"] = np.array(logits.astype(mx.float32))[0]
        return out

    def routing_taps(self, out: dict[str, np.ndarray], i: int) -> None:
        """Layer i's router logits and chosen experts (sorted), from what its gate gave."""
        p = f"layers.{i}."
        if p + "router_logits" not in out:  # the gate's product of its input, the ffn norm
            weight = np.array(self.model.model.layers[i].mlp.gate.weight.astype(mx.float32))
            out[p + "router_logits"] = out[p + "ffn_norm"] @ weight.T
        chosen = out.pop(p + "chosen", None)
        k = self.args.moe.num_experts_per_tok  # type: ignore[union-attr]
        r = out[p + "router_logits"]
        out[p + "experts"] = chosen_experts(r, k) if chosen is None else np.sort(chosen, -1)

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        with mx.stream(self.mx_device), self.recording() as taps:
            logits = self.model(mx.array([tokens]))
        return self.as_taps(taps, logits)

    def step(self, tokens: list[int], cache: list[Any]) -> mx.array:
        """One forward of a greedy run through mlx-lm's own cache: (1, T, V) logits."""
        with mx.stream(self.mx_device):
            logits = self.model(mx.array([tokens]), cache=cache)
            mx.eval(logits)
        return logits

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Greedy tokens, one forward per token through the cache, as ``step_taps`` replays it."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        out: list[int] = []
        feed = prompt
        for _ in range(n):
            logits = self.step(feed, cache)[0, -1]
            out.append(int(mx.argmax(logits.astype(mx.float32)).item()))
            feed = out[-1:]
        return out

    def step_taps(self, prompt: list[int], tokens: list[int]) -> dict[str, np.ndarray]:
        """The taps (1, ...) of the greedy step that chose the token after prompt + tokens,
        computed as ``greedy`` computed it: the earlier steps fill the cache first."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        feed = prompt
        for t in tokens:
            self.step(feed, cache)
            feed = [t]
        with self.recording() as taps:
            logits = self.step(feed, cache)
        return {name: a[-1:] for name, a in self.as_taps(taps, logits).items()}

    def timed(
        self, prompts: list[list[int]], gen_len: int, on_step: Callable[[], None] | None = None
    ) -> Callable[[], Timing]:
        """A timed greedy run through mlx-lm's own cache (equal-length prompts); ``on_step`` is
        called as each step's tokens are computed, the first token's too."""
        from mlx_lm.models.cache import make_prompt_cache

        tick = on_step or (lambda: None)

        def run() -> Timing:
            cache = make_prompt_cache(self.model)
            state = {}

            def advance(x: mx.array) -> None:
                logits = self.model(x, cache=cache)
                state["token"] = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
                mx.eval(state["token"])
                tick()

            def prefill() -> None:
                advance(mx.array(prompts))

            def decode() -> None:
                for _ in range(gen_len - 1):
                    advance(state["token"])

            with mx.stream(self.mx_device):
                return timed_run(self.meter, prefill, decode)

        return run
