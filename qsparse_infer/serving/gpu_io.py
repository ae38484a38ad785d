"""Host <-> device traffic of the batched GPU runner without synchronising copies.

Inputs go host -> pinned staging tensor -> device with non_blocking copies (torch's pinned-memory allocator
keeps a staging block alive until the copy that reads it has run, so a tensor may be dropped at once).
Outputs go device -> pinned tensor with non_blocking copies, then an event is recorded; `StepOutputs.result()`
waits on that event only (never on the whole device), so the host can plan and launch the next step while
this one runs, and read this one's tokens when they are there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import logprobs as lp
from .requests import TokenLogprob
from .runner import StepResult


def pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and torch.cuda.is_available() else t


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, through pinned memory, without blocking the host."""
    return pinned(torch.tensor(values, dtype=dtype)).to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Queue a copy of device tensor t into fresh pinned memory (valid once the step's event has fired)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(t, non_blocking=True)
    return out


def new_event() -> torch.cuda.Event:
    """An event on the current stream (spinning wait: the lowest wake-up latency; the GIL is released)."""
    ev = torch.cuda.Event()
    ev.record()
    return ev


@dataclass
class StepOutputs:
    """What one launched step returns, as pinned host tensors filled by queued copies; result() waits for the
    step's event and builds the StepResult. Rows of `tokens`: decode rows first, then one row per prefill chunk
    that samples (in plan order)."""
    n_chunks: int
    n_decode: int
    chunk_row: list[int | None]  # row of tokens for chunk i, None when the chunk does not sample
    tokens: torch.Tensor | None = None
    logprob_rows: list[int] = field(default_factory=list)  # rows (of tokens) whose logprobs were gathered
    logprob_k: list[int] = field(default_factory=list)  # the alternatives each of those rows asked for
    logprob_max_k: int = 0
    logprobs: torch.Tensor | None = None  # packed [len(logprob_rows), 1 + 2 max_k] (serving/logprobs.py)
    prompt: list[tuple[int, list[int], int, torch.Tensor]] = field(default_factory=list)  # (chunk, targets, k, packed)
    event: object | None = None  # torch.cuda.Event (anything with synchronize())

    def record(self) -> "StepOutputs":
        self.event = new_event()
        return self

    def result(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()  # this step only; releases the GIL while it waits
        toks = self.tokens.tolist() if self.tokens is not None else []
        row_lp: dict[int, TokenLogprob] = {}
        if self.logprob_rows:
            packed = lp.unpack(self.logprobs, [toks[r] for r in self.logprob_rows], self.logprob_max_k)
            for r, k, x in zip(self.logprob_rows, self.logprob_k, packed):
                x.top = x.top[:k]
                row_lp[r] = x
        n = self.n_chunks
        res = StepResult([None] * n, [None] * n, [None] * n, toks[:self.n_decode],
                         [row_lp.get(r) for r in range(self.n_decode)])
        for i, r in enumerate(self.chunk_row):
            if r is not None:
                res.prefill_tokens[i] = toks[r]
                res.prefill_logprobs[i] = row_lp.get(r)
        for i, targets, k, packed in self.prompt:
            res.prompt_logprobs[i] = lp.unpack(packed, targets, k)
        return res
