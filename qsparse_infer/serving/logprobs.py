"""Log-probabilities of chosen tokens and their top alternatives, from raw fp32 logits (the model's own
distribution: before temperature, penalties and filters). Plain torch ops, so the CPU runner and the GPU runner
(on the device, for the rows that ask) compute them with the same rules:

- logp = log_softmax(logits) in fp32, NaN logits treated as -inf (as the samplers do);
- top-k: the k largest logp, most likely first; equal values order by the lower token id. torch.topk alone does
  not say which of equal values it returns, so the ranking runs on int64 keys that are unique per row:
  (order-preserving integer image of the fp32 value) * 2^32 + (2^32 - 1 - token id).
"""
from __future__ import annotations

import torch

from .requests import TokenLogprob


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    x = torch.nan_to_num(logits.float(), nan=float("-inf"))
    return torch.log_softmax(x, dim=-1)


def rank_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys over the last dim of fp32 x: larger for larger x, for equal x larger for the lower index."""
    x = x.float() + 0.0  # -0.0 -> +0.0, so that equal values get equal value bits
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip magnitude bits -> monotone
    idx = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return bits * (1 << 32) + ((1 << 32) - 1 - idx)


def top_tokens(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [R, k], logp fp32 [R, k]) of the k most likely tokens per row of logp [R, V]."""
    k = min(k, logp.shape[-1])
    if k <= 0:
        empty = logp.new_empty((logp.shape[0], 0))
        return empty.to(torch.int64), empty
    ids = torch.topk(rank_keys(logp), k, dim=-1, sorted=True).indices
    return ids, torch.gather(logp, -1, ids)


def gather_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """For logits [R, V] and chosen ids [R] (same device): one fp32 tensor [R, 1 + 2k] holding per row the
    chosen token's logprob, then k top ids (as floats: exact below 2^24) and their k logprobs. One tensor so
    that a GPU caller copies it to the host in one transfer."""
    logp = log_softmax(logits)
    chosen_lp = torch.gather(logp, -1, chosen.view(-1, 1).to(torch.int64))
    ids, top_lp = top_tokens(logp, k)
    return torch.cat([chosen_lp, ids.to(torch.float32), top_lp], dim=-1)


def unpack(packed: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Host side of gather_logprobs: packed fp32 [R, 1 + 2k] (on the CPU) -> one TokenLogprob per row."""
    rows = packed.tolist()
    out = []
    for tok, row in zip(chosen, rows):
        top = [(int(i), float(v)) for i, v in zip(row[1:1 + k], row[1 + k:1 + 2 * k])]
        out.append(TokenLogprob(int(tok), float(row[0]), top))
    return out
