"""Hugging Face transformers as an outside reference for ``mistral diff``: taps and greedy runs."""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import torch

from backends.torch.measure import Meter
from backends.torch.runner import dtype_name, resolve_device, resolve_dtype
from mistral import hf
from mistral.args import ModelArgs
from mistral.checkpoint import write_checkpoint
from mistral.errors import MistralError
from mistral.hf import halves_to_pairs
from mistral.measure import Timing, timed_run
from mistral.taps import chosen_experts
from mistral.weights import RawTensor


class HFReference:
    """A Mistral/MixtralForCausalLM holding the same weights, loaded by transformers."""

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
                "the hf reference needs transformers: pip install transformers"
            ) from None
        self.args = args
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        self.device, self.dtype = str(dev), dtype_name(dt)
        self.meter = Meter(args, device, dtype)
        family = hf.model_type(args)  # mistral, mixtral, ministral or ministral3
        cls = getattr(transformers, hf.CLASSES[family])
        with tempfile.TemporaryDirectory() as tmp:  # transformers' own loader does its conversions
            write_checkpoint(tmp, "hf", args, dict(tensors))
            model = cls.from_pretrained(tmp, dtype=dt)  # its default attention (sdpa)
        self.model = model.to(dev).eval()
        self.modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    @torch.inference_mode()
    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        taps: dict[str, torch.Tensor] = {}
        inner = self.model.model
        hooks = []

        def record(name):
            def hook(module, inputs, output):
                taps[name] = output[0] if isinstance(output, tuple) else output

            return hook

        hooks.append(inner.embed_tokens.register_forward_hook(record("embeddings")))
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            hooks.append(layer.input_layernorm.register_forward_hook(record(p + "attention_norm")))
            hooks.append(layer.self_attn.register_forward_hook(record(p + "attention")))
            hooks.append(
                layer.post_attention_layernorm.register_forward_hook(record(p + "ffn_norm"))
            )
            if self.args.moe:
                hooks.append(layer.mlp.gate.register_forward_hook(record(p + "router_logits")))
            hooks.append(layer.mlp.register_forward_hook(record(p + "feed_forward")))
            hooks.append(layer.register_forward_hook(record(p + "residual")))
        hooks.append(inner.norm.register_forward_hook(record("norm")))
        rotated: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = self.modeling.apply_rotary_pos_emb

        def rope(*a, **kw):
            q, k = original(*a, **kw)
            rotated.append((q, k))
            return q, k

        self.modeling.apply_rotary_pos_emb = rope
        try:
            logits = self.model(torch.tensor([tokens], device=self.model.device)).logits
        finally:
            self.modeling.apply_rotary_pos_emb = original
            for h in hooks:
                h.remove()
        out = {name: t.float().cpu().numpy() for name, t in taps.items()}
        out = {k: v[0] if v.ndim == 3 else v for k, v in out.items()}  # drop the batch axis
        for i, (q, k) in enumerate(rotated):  # (1, H, T, D) in half order
            out[f"layers.{i}.q"] = halves_to_pairs(q[0].transpose(0, 1).float().cpu().numpy())
            out[f"layers.{i}.k"] = halves_to_pairs(k[0].transpose(0, 1).float().cpu().numpy())
        if self.args.moe:
            k = self.args.moe.num_experts_per_tok
            for i in range(self.args.n_layers):
                r = out[f"layers.{i}.router_logits"]
                out[f"layers.{i}.experts"] = chosen_experts(r, k)
        out["logits"] = logits[0].float().cpu().numpy()
        return out

    @torch.inference_mode()
    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.model.generation_config.eos_token_id = None
        x = torch.tensor([prompt], device=self.model.device)
        out = self.model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    def timed(self, prompts: list[list[int]], gen_len: int) -> Callable[[], Timing]:
        """A timed greedy run through transformers' own cache (equal-length prompts)."""
        device = self.model.device

        @torch.inference_mode()
        def run() -> Timing:
            state = {}

            def prefill() -> None:
                out = self.model(torch.tensor(prompts, device=device), use_cache=True)
                state["past"] = out.past_key_values
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["token"].cpu()

            def decode() -> None:
                for _ in range(gen_len - 1):
                    out = self.model(state["token"], past_key_values=state["past"], use_cache=True)
                    state["past"] = out.past_key_values
                    state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                    state["token"].cpu()  # our loop, too, sees every step's logits on the host

            return timed_run(self.meter, prefill, decode)

        return run
