"""The model-runner protocol the scheduler drives (see SERVING_API.md), and its CPU implementation.

`CpuRunner` keeps one reference-model KV cache per slot and decodes the active slots one after the other
with the same calls and sampling as the single-sequence CPU path (generation._CpuBackend), so its greedy
results equal `Engine.generate(..., temperature=0)` token for token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..generate.sampling import SamplingSettings, sample_cpu
from ..model.reference import KVCache


class ModelRunner(Protocol):
    max_slots: int  # sequences held at once (slots 0 .. max_slots-1)
    max_len: int  # positions per slot (prompt + generated tokens)
    vocab_size: int

    def begin(self, slot: int, settings: SamplingSettings, seed: int) -> None: ...

    def prefill(self, slot: int, ids: list[int], last: bool) -> int | None: ...

    def decode(self, slots: list[int]) -> list[int]: ...

    def release(self, slot: int) -> None: ...

    def length(self, slot: int) -> int: ...


@dataclass
class _Sequence:
    settings: SamplingSettings
    seed: int
    seen: torch.Tensor  # bool [vocab]: tokens the repetition penalty applies to
    steps: int = 0  # tokens sampled so far (the RNG's step counter)
    last: int = -1  # the last sampled token, fed by the next decode


class CpuRunner:
    """Reference model on the CPU; `max_len` is capped at the model's context."""

    def __init__(self, engine: Any, max_slots: int, max_len: int | None = None) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.cfg = engine.config
        self.model = engine.model
        self.max_slots = max_slots
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.vocab_size = self.cfg.vocab_size
        self._caches: list[KVCache | None] = [None] * max_slots  # allocated on first use, then reused
        self._seqs: list[_Sequence | None] = [None] * max_slots

    def begin(self, slot: int, settings: SamplingSettings, seed: int) -> None:
        if self._caches[slot] is None:
            self._caches[slot] = KVCache.empty(self.cfg, self.max_len)
        self._caches[slot].length = 0
        self._seqs[slot] = _Sequence(settings, seed, torch.zeros(self.vocab_size, dtype=torch.bool))

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], last: bool) -> int | None:
        seq, cache = self._active(slot), self._caches[slot]
        if cache.length + len(ids) > self.max_len:
            raise ValueError(f"slot {slot}: {cache.length + len(ids)} positions exceed max_len {self.max_len}")
        t = torch.as_tensor(ids, dtype=torch.int64)
        seq.seen[t] = True
        logits = self.model(t, cache, cache.length)
        return self._sample(seq, logits[-1]) if last else None

    @torch.no_grad()
    def decode(self, slots: list[int]) -> list[int]:
        out = []
        for slot in slots:
            seq, cache = self._active(slot), self._caches[slot]
            if cache.length >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} positions)")
            logits = self.model(torch.tensor([seq.last]), cache, cache.length)
            out.append(self._sample(seq, logits[-1]))
        return out

    def release(self, slot: int) -> None:
        self._seqs[slot] = None

    def length(self, slot: int) -> int:
        cache = self._caches[slot]
        return 0 if cache is None or self._seqs[slot] is None else cache.length

    def _active(self, slot: int) -> _Sequence:
        seq = self._seqs[slot]
        if seq is None:
            raise RuntimeError(f"slot {slot} has no sequence (begin() it first)")
        return seq

    @staticmethod
    def _sample(seq: _Sequence, logits: torch.Tensor) -> int:
        tok = sample_cpu(logits, seq.settings, seq.seen, seq.seed, seq.steps)
        seq.steps += 1
        seq.seen[tok] = True
        seq.last = tok
        return tok
