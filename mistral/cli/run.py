"""The commands that run a model: generate and chat."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simple_parsing as sp

from mistral import generate as gen
from mistral.api import Model
from mistral.chat import TEMPLATES, Message, encode_chat, template_version
from mistral.chat import Chat as Conversation
from mistral.cli.options import ModelOptions, SamplingOptions, read_stdin_prompt, write
from mistral.errors import MistralError
from mistral.messages import message_of
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


CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (/system alone clears it)
  /set NAME VALUE    a sampling option: temperature, top_p, top_k, min_p, max_tokens, seed
  /save FILE         write the conversation as JSON (system, template, messages)
  /load FILE         read a conversation written by /save (OpenAI-style messages)
  /quit              leave (so does Ctrl-D)
Ctrl-C stops an answer; at the prompt it clears the line."""
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int}


@dataclass
class Chat:
    """Chat with an instruct model: streaming answers, history kept in the cache across turns.

    Line editing and history as in a shell (readline). Commands: /help, /reset, /system TEXT,
    /set NAME VALUE, /save FILE, /load FILE, /quit. Ctrl-C stops the current answer and, at the
    prompt, clears the line; Ctrl-D (end of input) leaves.
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
        if self.model.parallel:  # every rank would read its own share of the terminal's lines
            raise MistralError("chat does not run over parallel ranks yet: use generate")
        model = self.model.load()
        tok = model.require_tokenizer()
        version = self.template or template_version(tok)
        encode_chat(tok, [Message("user", "hi")], version=version)  # a template it cannot serve
        chat = Conversation(model, self.system, self.template, self.context)
        interactive = sys.stdin.isatty()
        if interactive:
            enable_line_editing()
            print(
                f"[{model!r}, template {version}; /help for commands, Ctrl-D quits]",
                file=sys.stderr,
            )
        while True:
            try:
                text = input("> " if interactive else "")
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:  # at the prompt: the line is dropped, the chat goes on
                if not interactive:
                    print(file=sys.stderr)
                    return
                print("^C (Ctrl-D or /quit to leave)", file=sys.stderr)
                continue
            except UnicodeDecodeError:
                text = "\udcff"  # reported below, as a line Python let through undecoded is
            if not is_utf8(text):
                print("mistral chat: that line is not valid UTF-8; try again", file=sys.stderr)
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text, chat) == "quit":
                    return
                continue
            self.answer(chat, text)

    def answer(self, chat: Conversation, text: str) -> None:
        answer = chat.reply(text, self.sampling.max_tokens, **self.sampling.kwargs())
        try:
            for piece in answer:
                write(piece)
        except KeyboardInterrupt:
            answer.close()
            write(" [stopped]")
        write("\n")

    def command(self, line: str, chat: Conversation) -> str | None:
        """Runs one /command; a mistake is said on stderr and the chat goes on."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        try:
            if name in ("quit", "exit"):
                return "quit"
            if name == "help":
                print(CHAT_HELP, file=sys.stderr)
            elif name == "reset":
                chat.messages, chat.fed, chat.session = [], [], None
                say("conversation cleared")
            elif name == "system":
                chat.system = arg or None
                say(f"system prompt {'set' if arg else 'cleared'}")
            elif name == "set":
                self.set_option(arg)
            elif name == "save":
                save_conversation(chat, arg)
                say(f"saved {len(chat.messages)} messages to {arg}")
            elif name == "load":
                load_conversation(chat, arg)
                say(f"loaded {len(chat.messages)} messages from {arg}")
            else:
                raise MistralError(f"unknown command /{name} (/help lists them)")
        except MistralError as e:
            print(f"mistral chat: {e}", file=sys.stderr)
        return None

    def set_option(self, arg: str) -> None:
        key, _, value = arg.replace("-", "_").partition(" ")
        kinds = {**SETTABLE, "max_tokens": int}
        if key not in kinds or not value.strip():
            raise MistralError(f"use /set NAME VALUE with NAME one of {', '.join(kinds)}")
        try:
            number = kinds[key](value.strip())
        except ValueError:
            raise MistralError(f"{key} takes a number, not {value.strip()!r}") from None
        candidate = dataclasses.replace(self.sampling, **{key: number})
        s = candidate
        gen.check_options(s.max_tokens, s.temperature, s.top_p, s.seed, None, s.top_k, s.min_p)
        self.sampling = candidate
        say(f"{key} = {number}")


def say(text: str) -> None:
    print(f"[{text}]", file=sys.stderr)


def save_conversation(chat: Conversation, path: str) -> None:
    if not path:
        raise MistralError("use /save FILE")
    tok = chat.tok
    messages = [
        {
            "role": m.role,
            "content": m.content if isinstance(m.content, str) else tok.decode(m.content),
        }
        for m in chat.messages
    ]
    record = {"system": chat.system, "template": chat.version, "messages": messages}
    try:
        Path(path).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise MistralError(f"cannot write {path} ({e.strerror or e})") from None


def load_conversation(chat: Conversation, path: str) -> None:
    if not path:
        raise MistralError("use /load FILE")
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MistralError(f"cannot read {path} ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise MistralError(f"{path}: not a conversation written by /save")
    messages = [message_of(m, i) for i, m in enumerate(record["messages"])]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise MistralError(f"{path}: the system prompt must be text")
    chat.messages, chat.system, chat.fed, chat.session = messages, system, [], None


def enable_line_editing() -> None:
    """readline for input(): arrows, history (kept in ~/.mistral_history)."""
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline: input() as it is
        return
    history = Path.home() / ".mistral_history"
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)

    def keep() -> None:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)

    atexit.register(keep)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates stand for bytes that were not UTF-8
        return False
    return True
