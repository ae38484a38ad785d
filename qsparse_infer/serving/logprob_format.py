"""Log-probabilities in OpenAI's two shapes, from the scheduler's TokenLogprob entries:

- completions: `{"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
  "text_offset": [int]}`; as vLLM does, each position's top_logprobs holds the k most likely tokens plus the
  chosen one (so a client can always compare the two, as lm-evaluation-harness does for "is greedy");
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}` with
  exactly the k most likely in top_logprobs.

A token's string is the text it adds after the token before it (so sentencepiece's "▁the" reads " the" in
the middle of a text), or "token_id:N" for a model without a tokenizer (vLLM's spelling). A byte-fallback
piece that is not a whole character on its own (<0xE2>) reads as "bytes:\\xe2" in completions and carries its
raw byte in chat's `bytes`. `text_offset` counts the characters of the token strings before each token.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from .requests import TokenLogprob

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenStrings:
    """Token ids -> display strings, with a cache (the same pairs come back across a stream)."""

    def __init__(self, tokenizer: Any, cache_size: int = 1 << 16) -> None:
        self.tok = tokenizer
        self._cache: dict[tuple[int | None, int], str] = {}
        self._cache_size = cache_size

    def text(self, prev: int | None, token: int) -> str:
        if self.tok is None:
            return f"token_id:{token}"
        key = (prev, token)
        s = self._cache.get(key)
        if s is None:
            s = self._text(prev, token)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = s
        return s

    def _text(self, prev: int | None, token: int) -> str:
        decode = self.tok.decode
        s = None
        if prev is not None:
            before, both = decode([prev]), decode([prev, token])
            if both.startswith(before):
                s = both[len(before):]
        if s is None:
            s = decode([token])
        if "\ufffd" in s:
            raw = self.raw_byte(token)
            if raw is not None:
                return f"bytes:\\x{raw:02x}"
        return s

    def raw_byte(self, token: int) -> int | None:
        piece = self.tok.id_to_token(token) if self.tok is not None else None
        m = _BYTE_PIECE.match(piece or "")
        return int(m.group(1), 16) if m else None

    def bytes(self, token: int, text: str) -> list[int]:
        raw = self.raw_byte(token)
        if raw is not None and text.startswith("bytes:"):
            return [raw]
        if text.startswith("token_id:"):
            return []
        return list(text.encode("utf-8"))


def _finite(x: float) -> float:
    # JSON has no -Infinity: a token the model gives probability 0 gets the most negative float
    return x if math.isfinite(x) else -3.4028234663852886e38


class CompletionLogprobs:
    """Builds completions' logprobs objects for one choice, chunk by chunk (offsets carry over)."""

    def __init__(self, strings: TokenStrings, prev: int | None = None, offset: int = 0) -> None:
        self.strings, self.prev, self.offset = strings, prev, offset

    def add(self, entries: Sequence[TokenLogprob | None], ids: Sequence[int]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry, tok in zip(entries, ids):
            text = self.strings.text(self.prev, tok)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(_finite(entry.logprob))
                top: dict[str, float] = {}
                for alt, lp in entry.top:
                    top.setdefault(self.strings.text(self.prev, alt), _finite(lp))
                top.setdefault(text, _finite(entry.logprob))
                out["top_logprobs"].append(top)
            self.offset += len(text)
            self.prev = tok
        return out

    @staticmethod
    def join(parts: list[dict[str, list]]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in parts:
            for k in out:
                out[k].extend(p[k])
        return out


class ChatLogprobs:
    """Builds chat's logprobs.content entries for one choice."""

    def __init__(self, strings: TokenStrings, prev: int | None = None) -> None:
        self.strings, self.prev = strings, prev

    def add(self, entries: Sequence[TokenLogprob], ids: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        for entry, tok in zip(entries, ids):
            out.append({**self._one(tok, entry.logprob),
                        "top_logprobs": [self._one(alt, lp) for alt, lp in entry.top]})
            self.prev = tok
        return out

    def _one(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.strings.text(self.prev, token)
        return {"token": text, "logprob": _finite(logprob), "bytes": self.strings.bytes(token, text)}
