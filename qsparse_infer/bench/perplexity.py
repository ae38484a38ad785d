"""Perplexity of an engine-like object (`.logits(ids)`, `.config`) over a token stream: the measure behind
`qsparse eval` (cli/eval.py), which also tabulates it against the sparsity.

Windows are those of the trainer's validation (train/data.py TokenStream.windows), so the built-in model's
number at its own sparsity reproduces the validation loss it was trained to: with a BOS id, window j reads
[BOS, t[jL], ..., t[jL + L - 2]] and predicts t[jL .. jL + L - 1] (L tokens, every token of the stream
predicted once); without one, it reads t[jL .. jL + L - 1] and predicts the next L tokens. The last partial
window is dropped. Each window is one full-sequence forward (engine.logits: the CPU reference or the GPU
prefill path), so tokens/s is a prefill rate, not a decode rate.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic_io import write_json


@dataclass
class Perplexity:
    tokens: int  # tokens predicted
    nll: float  # mean negative log-likelihood per predicted token (nats)
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "nll": self.nll, "ppl": self.ppl, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s}


def windows(tokens: torch.Tensor | list[int], length: int, bos: int | None,
            max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, L], targets [N, L]) int64 over the stream, as described above."""
    t = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if length < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {length}")
    extra = 0 if bos is not None else 1
    n = (t.numel() - extra) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the text has {t.numel()} tokens, fewer than one window of {length + extra}; give more "
                         f"text or a smaller --window")
    starts = torch.arange(n)[:, None] * length
    if bos is None:
        w = t[starts + torch.arange(length + 1)[None, :]]
        return w[:, :-1], w[:, 1:]
    y = t[starts + torch.arange(length)[None, :]]
    return torch.cat([torch.full_like(y[:, :1], bos), y[:, :-1]], dim=1), y


def evaluate(engine: Any, inputs: torch.Tensor, targets: torch.Tensor, progress: bool = True,
             desc: str = "eval") -> Perplexity:
    """Mean NLL of `targets` given `inputs`, window by window through engine.logits."""
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=int(targets.numel()), unit="tok", unit_scale=True, desc=desc,
               disable=not progress or not sys.stderr.isatty())
    with torch.no_grad():
        for x, y in zip(inputs, targets):
            logits = engine.logits(x).float().cpu()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            count += y.numel()
            bar.update(y.numel())
    bar.close()
    return Perplexity(count, total / count, time.perf_counter() - t0)


def save_table(path: str, table: dict[str, Any]) -> None:
    """`qsparse eval --json`: the table, written atomically."""
    write_json(path, table)
