"""The command that generates text from prompts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simple_parsing as sp

from mistral import generate as gen
from mistral.api import Model
from mistral.cli.options import ModelOptions, SamplingOptions, read_stdin_prompt, write
from mistral.errors import MistralError
from mistral.stops import StopText
from mistral.tokenizer import Tokenizer


@dataclass
class Generate:
    """Generate text from prompts, each streamed as it comes, with speed and memory at the end."""

    prompt: list[str] = sp.field(default_factory=list, action="append", nargs=None)
    """Prompt text; repeat for more prompts (run one after another, each labelled). Without
    --prompt or --prompts-file the prompt is read from standard input."""
    prompts_file: str | None = None
    """A text file of prompts, one a line (blank lines skipped)."""
    stop: list[str] = sp.field(default_factory=list, action="append", nargs=None)
    """Stop a prompt's generation where this text appears (the text is not printed); repeat for
    several. Generation also stops at the tokenizer's end of sequence."""
    json: bool = False
    """Print one JSON object per prompt (prompt, text, token ids, why it stopped) instead of
    streaming text."""
    logprobs: int = 0
    """With --json: for each generated token its log-probability and the N most likely tokens'
    (a log-softmax of the model's logits, before sampling's temperature and cuts)."""
    quiet: bool = False
    """Print the generated text only: no prompt echo, no labels, no speed line."""
    chunk_size: int | None = None
    """Feed prompts in chunks of this many tokens (bounded memory for long prompts)."""
    model: ModelOptions = sp.field(default_factory=ModelOptions)
    sampling: SamplingOptions = sp.field(default_factory=SamplingOptions)

    def run(self) -> None:
        prompts = self.read_prompts()
        self.check()
        model = self.model.load()
        tok = model.require_tokenizer()
        encoded = [tok.encode(text) for text in prompts]  # text that is not UTF-8: refused here
        results = []
        start = time.perf_counter()
        for i, (text, ids) in enumerate(zip(prompts, encoded, strict=True)):
            if not (self.json or self.quiet):
                if len(prompts) > 1:
                    write(f"[{i + 1}/{len(prompts)}] ", bold=True)
                write(text, bold=True)
            result = self.generate_one(model, tok, text, ids)
            results.append(result)
            if self.json:
                print(json.dumps(result, ensure_ascii=False), flush=True)
            else:
                write("\n\n" if len(prompts) > 1 and i < len(prompts) - 1 else "\n")
        if not self.quiet:
            report(results, time.perf_counter() - start, model.peak_memory())

    def read_prompts(self) -> list[str]:
        prompts = list(self.prompt)
        if self.prompts_file:
            prompts += read_prompts_file(self.prompts_file)
        return prompts or [read_stdin_prompt()]

    def check(self) -> None:
        """Refuses bad options before anything is loaded or printed."""
        s = self.sampling
        gen.check_options(
            s.max_tokens, s.temperature, s.top_p, s.seed, self.chunk_size, s.top_k, s.min_p
        )
        StopText(self.stop)
        if not isinstance(self.logprobs, int) or self.logprobs < 0:
            raise MistralError(f"--logprobs must be >= 0, got {self.logprobs}")
        if self.logprobs and not self.json:
            raise MistralError("--logprobs needs --json (the numbers go into its objects)")

    def generate_one(self, model: Model, tok: Tokenizer, text: str, ids: list[int]) -> dict:
        """Streams one prompt's continuation (unless --json); its JSON object."""
        decoder, stops = tok.decoder(after=ids), StopText(self.stop)
        seen: list[np.ndarray] = []  # the logits each token was drawn from (--logprobs)
        observe = seen.append if self.logprobs else None
        tokens: list[int] = []
        out, reason, t0, first = "", "length", time.perf_counter(), None
        steps = model.stream(
            [ids],
            self.sampling.max_tokens,
            eos_id=tok.eos_id,
            chunk_size=self.chunk_size,
            observe=observe,
            **self.sampling.kwargs(),
        )
        logprobs = []
        for (token,) in steps:
            first = first or time.perf_counter()
            if self.logprobs:
                logprobs.append(token_logprobs(seen.pop()[0], token, self.logprobs, tok))
            if token is None or token == tok.eos_id:
                reason = "eos"
                break
            tokens.append(token)
            out += self.show(stops.push(decoder.push(token)))
            if stops.stopped:
                reason = "stop"
                break
        steps.close()
        if not stops.stopped:
            out += self.show(stops.push(decoder.flush()) + stops.flush())
        end = time.perf_counter()
        result = {"prompt": text, "text": out, "prompt_tokens": ids, "tokens": tokens}
        result |= {"finish_reason": reason} | ({"logprobs": logprobs} if self.logprobs else {})
        result["timing"] = {"prefill_s": (first or end) - t0, "decode_s": end - (first or end)}
        return result

    def show(self, piece: str) -> str:
        if piece and not self.json:
            write(piece)
        return piece


def token_logprobs(logits: np.ndarray, token: int, n: int, tok: Tokenizer) -> dict:
    """One generated token's log-probability and the n most likely tokens' (float64)."""
    z = logits.astype(np.float64)
    lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    top = np.argsort(-lp, kind="stable")[:n]
    alternatives = [{"token": int(t), "logprob": float(lp[t])} for t in top]
    return {"token": int(token), "piece": tok.decode([int(token)]), "logprob": float(lp[token])} | {
        "top": alternatives
    }


def read_prompts_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MistralError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise MistralError(f"{path}: cannot read ({e.strerror or e})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise MistralError(f"{path}: no prompts (one a line)")
    return prompts


def report(results: list[dict], wall: float, memory: tuple[int, str]) -> None:
    """The speed line(s) on stderr: prompt tokens/s, generation tokens/s, peak memory."""
    n_prompt = sum(len(r["prompt_tokens"]) for r in results)
    prefill = sum(r["timing"]["prefill_s"] for r in results)
    decode = sum(r["timing"]["decode_s"] for r in results)
    n_new = sum(len(r["tokens"]) for r in results)
    lines = [
        f"prompt: {n_prompt} tokens in {prefill:.2f}s ({n_prompt / max(prefill, 1e-9):.1f} tok/s)"
    ]
    steps = n_new - len(results)  # the first token of each prompt comes with its prefill
    if steps > 0:
        lines.append(
            f"generation: {n_new} tokens, {steps / max(decode, 1e-9):.1f} tok/s after the first"
        )
    peak, kind = memory
    lines.append(f"peak memory: {peak / 2**20:,.0f} MiB ({kind}); {wall:.2f}s in all")
    print("\n".join(lines), file=sys.stderr)
