"""Stop texts for streamed generation: what could still become one is held back, and the text
ends where the first one begins (the stop text itself is never shown)."""

from __future__ import annotations

from mistral.errors import MistralError


class StopText:
    """Feeds on streamed pieces, gives back what is safe to show.

    E.g. stops ["\\n\\n"]: push("Hello\\n") gives "Hello" and holds "\\n" (it may begin a stop);
    push("\\nBye") finds "\\n\\n" and gives "", and ``stopped`` is then True."""

    def __init__(self, stops: list[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise MistralError(f"stop texts must be non-empty strings, got {stops!r}")
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The part of ``held + piece`` that can be shown now."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((self.overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the generation ended without a stop."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    @staticmethod
    def overlap(text: str, stop: str) -> int:
        """The length of the longest end of ``text`` that begins ``stop``."""
        for n in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-n:]):
                return n
        return 0
