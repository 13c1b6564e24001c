"""Incremental detokenisation with stop strings, shared by the engines.

Text is emitted only once it is final: a trailing U+FFFD (half of a multi-byte character split
across tokens) is held back, and so is any suffix that could still grow into a stop string.
When a stop string appears, the text is cut before it and the sequence finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly final text (empty while held back)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self.text = self._decode(self._ids)
        for s in self._stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted: upto]
        self._emitted = upto
        return out
