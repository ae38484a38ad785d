"""Token ids -> streamed text with stop strings: shared by `generation.stream` and the serving scheduler.

Text that could still grow into a stop string is held back until it either completes one (the text ends
before the stop string) or can no longer do so; the concatenation of the emitted pieces is then exactly
the decoded text cut at the first stop string.
"""
from __future__ import annotations

from typing import Any, Sequence


def parse_stops(stop: str | Sequence[str] | None) -> list[str]:
    """Normalise a stop argument (None, one string or several) to a list of non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    return stops


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _first_stop(text: str, stops: list[str]) -> int:
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


class TextAssembler:
    """Feed generated token ids with `push`; each call returns the text that may be shown now. `stopped`
    turns True once a stop string appeared (the caller then ends the generation). Call `finish` once at
    the end of a generation that did not stop on a string, for the text still held back."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stops = list(stops)
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        cut = _first_stop(self.pending, self.stops)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0 if final else held_back(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out
