"""The chat command: a conversation at the terminal, in one process or over parallel ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import simple_parsing as sp

from mistral import generate as gen
from mistral.api import Model
from mistral.chat import TEMPLATES, Message, encode_chat, template_version
from mistral.chat import Chat as Conversation
from mistral.cli.options import ModelOptions, SamplingOptions, launcher_rank, write
from mistral.errors import MistralError
from mistral.messages import message_of

CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (/system alone clears it)
  /set NAME VALUE    a sampling option: temperature, top_p, top_k, min_p, max_tokens, seed
  /save FILE         write the conversation as JSON (system, template, messages)
  /load FILE         read a conversation written by /save (OpenAI-style messages)
  /quit              leave (so does Ctrl-D)
Ctrl-C stops an answer; at the prompt it clears the line (over parallel ranks it ends the chat)."""
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int}


@dataclass
class Chat:
    """Chat with an instruct model: streaming answers, history kept in the cache across turns.

    Line editing and history as in a shell (readline). Commands: /help, /reset, /system TEXT,
    /set NAME VALUE, /save FILE, /load FILE, /quit. Ctrl-C stops the current answer and, at the
    prompt, clears the line; Ctrl-D (end of input) leaves. Over parallel ranks (--parallel) rank
    0 reads the lines and every rank runs them; Ctrl-C still stops an answer typed at rank 0's
    terminal (torchrun), while at the prompt it is the launcher's, which ends every rank.
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
        tok = model.require_tokenizer()
        version = self.template or template_version(tok)
        encode_chat(tok, [Message("user", "hi")], version=version)  # a template it cannot serve
        chat = Conversation(model, self.system, self.template, self.context)
        interactive = self.first and sys.stdin.isatty()
        if interactive:
            enable_line_editing()
            print(
                f"[{model!r}, template {version}; /help for commands, Ctrl-D quits]",
                file=sys.stderr,
            )
        while (
            text := shared_line(model, self.read_line(interactive) if self.first else None)
        ) is not None:
            if text.startswith("/"):
                if self.command(text, chat) == "quit":
                    return
                continue
            self.answer(chat, text, interactive)

    @property
    def first(self) -> bool:
        """Whether this process reads the terminal and writes files: rank 0, or the one process."""
        return not self.model.parallel or launcher_rank() == 0

    def read_line(self, interactive: bool) -> str | None:
        """The next line worth running, as typed; None at the end of input."""
        while True:
            try:
                text = input("> " if interactive else "")
            except EOFError:
                print(file=sys.stderr)
                return None
            except KeyboardInterrupt:  # at the prompt: the line is dropped, the chat goes on
                if self.model.parallel:  # the launcher took it too, and is ending every rank
                    raise
                if not interactive:
                    print(file=sys.stderr)
                    return None
                print("^C (Ctrl-D or /quit to leave)", file=sys.stderr)
                continue
            except UnicodeDecodeError:
                text = "\udcff"  # reported below, as a line Python let through undecoded is
            if not is_utf8(text):
                print("mistral chat: that line is not valid UTF-8; try again", file=sys.stderr)
            elif text.strip():
                return text

    def answer(self, chat: Conversation, text: str, interactive: bool) -> None:
        """Streams the answer. Over parallel ranks every rank hears after each piece whether
        rank 0 was asked to stop, so that all stop at the same token."""
        answer = chat.reply(text, self.sampling.max_tokens, **self.sampling.kwargs())
        keys = interactive and bool(self.model.parallel)
        with ctrl_c_as_a_key() if keys else contextlib.nullcontext(lambda: False) as pressed:
            try:
                for piece in answer:
                    write(piece)
                    if chat.model.share(b"stop" if pressed() else b""):
                        answer.close()
                        write(" [stopped]")
                        break
            except KeyboardInterrupt:
                if self.model.parallel:  # the launcher's: it is ending every rank
                    raise
                answer.close()
                write(" [stopped]")
        write("\n")

    def command(self, line: str, chat: Conversation) -> str | None:
        """Runs one /command (on every rank); a mistake is said on stderr and the chat goes on."""
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
                if self.first:  # one file, written once
                    save_conversation(chat, arg)
                say(f"saved {len(chat.messages)} messages to {arg}")
            elif name == "load":
                load_conversation(chat, arg, shared_file(chat.model, arg, self.first))
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


def shared_line(model: Model, text: str | None) -> str | None:
    """Rank 0's line (None: the end) on every rank; in one process, the line itself."""
    shared = model.share(b"" if text is None else b"L" + text.encode())
    return shared[1:].decode() if shared else None


def shared_file(model: Model, path: str, first: bool) -> str:
    """The text of the file as rank 0 (``first``) reads it, on every rank (where the others may
    have no such file), or the same error on every rank."""
    if not path:
        raise MistralError("use /load FILE")
    said = b""
    if first:
        try:
            said = b"T" + Path(path).read_text(encoding="utf-8").encode()
        except (OSError, UnicodeDecodeError) as e:
            said = b"E" + f"cannot read {path} ({str(e).splitlines()[0]})".encode()
    said = model.share(said)
    if said[:1] != b"T":
        raise MistralError(said[1:].decode())
    return said[1:].decode()


@contextlib.contextmanager
def ctrl_c_as_a_key() -> Iterator[Callable[[], bool]]:
    """While an answer streams over parallel ranks: rank 0's terminal hands Ctrl-C over as a
    key, not as a signal to the launcher (torchrun would end every rank), and the callable
    given says whether it was pressed. The terminal's settings come back as the block ends,
    also when the launcher ends the process (SIGTERM)."""
    import termios

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)  # lflags
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
    on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def pressed() -> bool:
        ready, _, _ = select.select([fd], [], [], 0)
        return bool(ready) and b"\x03" in os.read(fd, 1024)  # other keys typed now are dropped

    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
        signal.signal(signal.SIGTERM, on_term)


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


def load_conversation(chat: Conversation, path: str, text: str) -> None:
    """The conversation ``text`` (read from ``path``) in place of the chat's."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
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
