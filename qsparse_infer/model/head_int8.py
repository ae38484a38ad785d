"""The opt-in int8 LM head: the math spec, the quantizer and the engine-file tensors that carry it.

Per-row absmax, weights only (the head input stays fp32, no activation quantization):
  scale[r] = max_j |W[r, j]| / 127                      (fp32; 0 for an all-zero row)
  Q[r, j]  = clip(round_half_even(W[r, j] / scale[r]), -127, 127)   (int8; 0 where scale is 0)
  logits[r] = scale[r] * sum_j Q[r, j] * x[j]           (x: the final-normed hidden state, fp32)

At 2B4T shape this halves the largest read of a decode step (the bf16 head is 657 MB, the int8 one 328 MB +
0.5 MB of scales). The engine file stores it beside the float head/embedding (which the embedding lookup
still needs when tied) as `lm_head.q8` / `lm_head.q8_scales`; see docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

Q8 = "lm_head.q8"
Q8_SCALES = "lm_head.q8_scales"
LM_HEAD_MODES = ("bf16", "int8")  # "bf16": the float head as stored (bf16, fp16 or fp32)


def quantize_head(w: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """W [V, H] float -> (Q int8 [V, H], scales fp32 [V]) on W's device, in row chunks (bounded fp32 temp).

    Computed on the CPU whatever W's device: torch's CUDA division may round a quotient differently from the
    CPU's, and a quantized head must not depend on where it was made (tests/kernels/test_head_int8_gpu.py)."""
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"the head weight must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    v, h = w.shape
    q = torch.empty((v, h), dtype=torch.int8)
    scales = torch.empty(v, dtype=torch.float32)
    for a in range(0, v, chunk_rows):
        rows = w[a:a + chunk_rows].to("cpu", torch.float32)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("the head weight has non-finite values; cannot quantize it to int8")
        s = rows.abs().amax(dim=1) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q[a:a + chunk_rows] = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[a:a + chunk_rows] = s
    return q.to(w.device), scales.to(w.device)


def int8_head_logits(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference: x [..., H] (fp32) -> fp32 logits [..., V] = scales * (x @ Q^T). Q's values are small
    integers, exact in fp32, so this is the spec's sum in fp32."""
    return (x.float() @ q.float().t()) * scales.to(torch.float32)


def head_source(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float head weight: `lm_head` when untied, else the embedding table."""
    return tensors["lm_head"] if "lm_head" in tensors else tensors["embed_tokens"]


def has_int8_head(tensors: dict[str, torch.Tensor]) -> bool:
    return Q8 in tensors


def with_lm_head(ef: Any, mode: str | None) -> Any:
    """`ef` (an EngineFile or random_engine namespace) set up for head `mode`: None keeps what the file has;
    "int8" adds the quantized head when the file has none (quantized on the tensors' device, at load time);
    "bf16" drops a stored int8 head so the float head runs. Returns a shallow copy when anything changes."""
    if mode is None:
        return ef
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {mode!r}")
    has = has_int8_head(ef.tensors)
    if (mode == "int8") == has:
        return ef
    out = copy.copy(ef)
    tensors = dict(ef.tensors)
    if mode == "int8":
        tensors[Q8], tensors[Q8_SCALES] = quantize_head(head_source(tensors))
    else:
        tensors.pop(Q8)
        tensors.pop(Q8_SCALES)
    out.tensors = tensors
    return out
