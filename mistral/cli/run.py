"""The commands that run a model: generate and chat."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import simple_parsing as sp

from mistral.chat import TEMPLATES, template_version
from mistral.chat import Chat as Conversation
from mistral.cli.options import ModelOptions, SamplingOptions, read_stdin_prompt, write


@dataclass
class Generate:
    """Generate text from one or more prompts, streamed, with tokens/s at the end."""

    prompt: list[str] = sp.field(default_factory=list, action="append", nargs=None)
    """Prompt text; repeat for a batch. Without it the prompt is read from standard input."""
    chunk_size: int | None = None
    """Feed prompts in chunks of this many tokens (bounded memory for long prompts)."""
    model: ModelOptions = sp.field(default_factory=ModelOptions)
    sampling: SamplingOptions = sp.field(default_factory=SamplingOptions)

    def run(self) -> None:
        prompts = self.prompt or [read_stdin_prompt()]
        model = self.model.load()
        tok = model.require_tokenizer()
        ids = [tok.encode(p) for p in prompts]
        single = len(ids) == 1
        decoders = [tok.decoder(after=row) for row in ids]
        texts = ["" for _ in ids]
        rows: list[list[int]] = [[] for _ in ids]
        if single:
            write(prompts[0], bold=True)
        start = time.perf_counter()
        first = None
        for step in model.stream(
            ids,
            self.sampling.max_tokens,
            eos_id=tok.eos_id,
            chunk_size=self.chunk_size,
            **self.sampling.kwargs(),
        ):
            first = first or time.perf_counter()
            for b, t in enumerate(step):
                if t is not None and t != tok.eos_id:
                    rows[b].append(t)
                    piece = decoders[b].push(t)
                    texts[b] += piece
                    if single:
                        write(piece)
        end = time.perf_counter()
        tails = [d.flush() for d in decoders]
        if single:
            write(tails[0] + "\n")
        else:
            for p, text, tail in zip(prompts, texts, tails, strict=True):
                write(p, bold=True)
                write(text + tail + "\n\n")
        report_speed(ids, rows, start, first or end, end)


def report_speed(prompts: list[list[int]], rows: list[list[int]], start, first, end) -> None:
    n_prompt = sum(map(len, prompts))
    n_new = sum(map(len, rows))
    prefill = first - start
    decode = end - first
    lines = [
        f"prompt: {n_prompt} tokens in {prefill:.2f}s ({n_prompt / max(prefill, 1e-9):.1f} tok/s)"
    ]
    if n_new > len(rows):
        # The first token of each row comes with the prefill; the rest are decode steps.
        steps = n_new - len(rows)
        lines.append(
            f"generation: {n_new} tokens, {steps / max(decode, 1e-9):.1f} tok/s after the first"
        )
    print("\n".join(lines), file=sys.stderr)


@dataclass
class Chat:
    """Chat with an instruct model: streaming answers, history kept in the cache across turns.

    Ctrl-C stops the current answer and keeps the session; Ctrl-D (end of input) leaves.
    """

    system: str | None = None
    """System prompt (placed as the model's instruct format places it)."""
    template: str | None = sp.choice(*TEMPLATES, default=None)
    """Prompt format, as mistral-common renders it: v1 ([INST] as text), v2/v3 (control tokens,
    system prompt in the last user turn), v7/v11/v13 ([SYSTEM_PROMPT] tokens). Default: the one
    the tokenizer file declares."""
    context: int = 4096
    """Cache length for models without a sliding window."""
    model: ModelOptions = sp.field(default_factory=ModelOptions)
    sampling: SamplingOptions = sp.field(default_factory=lambda: SamplingOptions(512, 0.35))

    def run(self) -> None:
        model = self.model.load()
        chat = Conversation(model, self.system, self.template, self.context)
        interactive = sys.stdin.isatty()
        if interactive:
            version = self.template or template_version(chat.tok)
            print(
                f"[{model!r}, template {version}; Ctrl-C stops an answer, Ctrl-D quits]",
                file=sys.stderr,
            )
        while True:
            try:
                text = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            except UnicodeDecodeError:
                text = "\udcff"  # reported below, as a line Python let through undecoded is
            if not is_utf8(text):
                print("mistral chat: that line is not valid UTF-8; try again", file=sys.stderr)
                continue
            if not text.strip():
                continue
            answer = chat.reply(text, self.sampling.max_tokens, **self.sampling.kwargs())
            try:
                for piece in answer:
                    write(piece)
            except KeyboardInterrupt:
                answer.close()
                write(" [stopped]")
            write("\n")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates stand for bytes that were not UTF-8
        return False
    return True
