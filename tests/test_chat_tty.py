"""`mistral chat` in a pseudo-terminal, as a person uses it: line editing and history, commands,
Ctrl-C at the prompt and during an answer, Ctrl-D; over two ranks under torchrun."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from tests.helpers import ROOT


class Terminal:
    """The chat on a pseudo-terminal: type into it, read what it shows."""

    def __init__(self, *argv: str, home, launcher: tuple[str, ...] = ()) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "HOME": str(home), "TERM": "xterm", "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "-m", "mistral", "chat", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            close_fds=True,
            start_new_session=True,  # and the terminal its own, so Ctrl-C reaches it
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 60) -> str:
        """Everything shown until ``pattern`` (a regex) appears in what is new."""
        start, end = len(self.seen), time.monotonic() + timeout
        while not re.search(pattern, self.seen[start:]):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {self.seen[start:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the chat ended
                    break
        return self.seen[start:]

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.fixture
def term(tmp_path):
    t = Terminal("--max-tokens", "200", "--temperature", "0", home=tmp_path)
    t.read_until(r"/help for commands.*\n> ")
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.close()


def test_commands_history_and_ctrl_d(term, tmp_path):
    term.type("/set max_tokens 6\r")
    assert "max_tokens = 6" in term.read_until(r"> ")
    term.type("/system Speak plainly.\r")
    assert "system prompt set" in term.read_until(r"> ")
    term.type("Who was Noah?\r")
    first = term.read_until(r"\n> ")
    term.type("\x1b[A\r")  # up: the history brings back "Who was Noah?"
    assert "Who was Noah?" in term.read_until(r"\n> ")
    term.type(f"/save {tmp_path / 'c.json'}\r")
    assert "saved 4 messages" in term.read_until(r"> ")
    term.type("/bogus\r")
    assert "unknown command /bogus" in term.read_until(r"> ")
    term.type("\x04")  # Ctrl-D leaves
    assert term.close() == 0
    assert first.strip()
    assert (tmp_path / ".mistral_history").read_text().count("Who was Noah?") >= 1


def test_ctrl_c_clears_the_prompt_and_stops_an_answer(term):
    term.type("half a line\x03")  # Ctrl-C at the prompt: the line goes, the chat stays
    assert "Ctrl-D or /quit to leave" in term.read_until(r"> ")
    term.type("Tell me of the flood.\r")
    term.read_until(r"flood\.\r\n.")  # the answer has begun
    term.type("\x03")  # Ctrl-C during the answer stops it
    assert "[stopped]" in term.read_until(r"\[stopped\]\s*\n> ")
    term.type("/quit\r")
    assert term.close() == 0


def test_ctrl_c_stops_an_answer_on_every_rank_under_torchrun(tmp_path):
    """Rank 0 reads the terminal torchrun was started from: during an answer Ctrl-C comes to it
    as a key (as a signal torchrun would end every rank), and every rank stops at the same
    token, so the next answer still runs on both."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    argv = ("--max-tokens", "3000", "--temperature", "0", "--parallel", "tensor")
    term = Terminal(*argv, home=tmp_path, launcher=launcher)
    try:
        term.read_until(r"/help for commands.*\n> ")
        term.type("Tell me of the flood.\r")
        term.read_until(r"flood\.\r\n.")  # the answer has begun
        term.type("\x03")
        assert "[stopped]" in term.read_until(r"\[stopped\]\s*\n> ")
        term.type("/set max_tokens 5\r")
        term.read_until(r"max_tokens = 5.*\n> ")
        term.type("And Noah?\r")
        assert term.read_until(r"Noah\?\r\n.*\n> ").count("\n") >= 2  # answered, in step
        term.type("/quit\r")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.close()
