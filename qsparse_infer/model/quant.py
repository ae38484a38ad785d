"""The quantization math (the spec every kernel must match); the engine format's packing is `packing.py`.

BitLinear, as Q-Sparse runs it at inference, for one token x of D channels and K = topk_count(D, S):
  gamma = max(max|x|, 1e-5)                      # per-token absmax
  q     = clip(round_half_even(x * (127 / gamma)), -128, 127)   # int8, in fp32 arithmetic
  keep the K channels of largest |x| (ties: the lower index wins), zero the rest
  acc   = sum_k q[k] * T[n, k]                    # int32, exact
  y[n]  = acc * (gamma * beta / 127)              # beta: the per-tensor absmean weight scale
The largest |x| is always kept (K >= 1), so quantizing before or after the mask gives the same scale.

Full precision (config.precision "bf16"), for one token x of D channels: y = (x ⊙ M) · Wᵀ + b with M the same
top-K mask (sparsify_topk); with topk_rescale "l2" the kept values are then multiplied by ||x||₂ / ||x ⊙ M||₂
(the paper re-scales the sparsified tensor by its L2 norm; this is our reading: the norm the top-K removed is
put back, so K = D changes nothing). fp32 throughout; weights are read as stored (bf16) and widened exactly.
"""
from __future__ import annotations

import torch

ABSMAX_EPS = 1e-5
WEIGHT_EPS = 1e-5

# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def absmax_gamma(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax, clamped away from zero; shape [..., 1], float32."""
    return x.float().abs().amax(dim=-1, keepdim=True).clamp(min=ABSMAX_EPS)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization. Returns (q as int8, gamma [..., 1] float32)."""
    x = x.float()
    gamma = absmax_gamma(x)
    scale = 127.0 / gamma
    q = torch.round(x * scale).clamp(-128, 127)  # torch.round is round-half-to-even
    return q.to(torch.int8), gamma


def _rank_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys over the last dim: larger for larger |x|, and for equal |x| larger for the lower index, so they
    are unique per row and rank exactly as the tie rule says. |x| is a non-negative float (NaN above inf, as
    torch.sort ranks it), whose bit pattern as an integer is monotone in its value."""
    bits = x.float().abs().contiguous().view(torch.int32).to(torch.int64)
    idx = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return bits * (1 << 32) + ((1 << 32) - 1 - idx)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |x| along the last dim, ascending. Ties go to the lower index.

    (The same set as a stable descending sort of |x| keeps in its first k places.)
    """
    mask = topk_mask(x, k)
    idx = torch.arange(x.shape[-1], device=x.device).expand(mask.shape)
    return idx[mask].view(*x.shape[:-1], k)  # row-major order: ascending within each row


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the channels topk_indices keeps: keys at or above each row's k-th largest key (the keys
    are unique, so exactly k per row). Faster than a full sort, most of all for several rows at once."""
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"k={k} out of range for dimension {x.shape[-1]}")
    if k == x.shape[-1]:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    keys = _rank_keys(x)
    kth = torch.topk(keys, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return keys >= kth


def l2_rescale(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """||x||₂ / ||kept||₂ per row [..., 1] (fp32; 1 where kept is all zero, i.e. x is)."""
    full = x.float().pow(2).sum(-1, keepdim=True)
    part = kept.float().pow(2).sum(-1, keepdim=True)
    return torch.where(part > 0, torch.sqrt(full) / torch.sqrt(part.clamp(min=1e-30)), torch.ones_like(part))


def sparsify_topk(x: torch.Tensor, k: int, rescale: str = "none") -> torch.Tensor:
    """Full-precision Q-Sparse input: x (fp32) with only its top-k |x| channels kept (ties: the lower index),
    then, with rescale "l2", multiplied by l2_rescale. k == D returns x unchanged."""
    x = x.float()
    if k >= x.shape[-1]:
        return x
    kept = torch.where(topk_mask(x, k), x, torch.zeros_like(x))
    if rescale == "l2":
        kept = kept * l2_rescale(x, kept)
    elif rescale != "none":
        raise ValueError(f"rescale must be 'none' or 'l2', got {rescale!r}")
    return kept


def dense_linear(x: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                 rescale: str = "none") -> torch.Tensor:
    """Reference full-precision projection: weight [N, D] (any float dtype, widened to fp32), fp32 [..., N]."""
    y = sparsify_topk(x, k, rescale) @ weight.float().t()
    return y if bias is None else y + bias.float()


def quantize_sparse_int8(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations with only the top-k channels kept (others 0), and gamma [..., 1]."""
    q, gamma = quantize_int8(x)
    if k < x.shape[-1]:
        q = torch.where(topk_mask(x, k), q, torch.zeros_like(q))
    return q, gamma


def bitlinear(x: torch.Tensor, ternary: torch.Tensor, beta: torch.Tensor | float, k: int) -> torch.Tensor:
    """Reference BitLinear: x [..., D] float, ternary [N, D] in {-1,0,1}, beta scalar. Returns fp32 [..., N]."""
    q, gamma = quantize_sparse_int8(x, k)
    acc = int_matmul(q, ternary)
    beta = torch.as_tensor(beta, dtype=torch.float32, device=x.device)
    return acc.float() * (gamma * beta / 127.0)


def int_matmul(q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """Exact int32 q @ ternary.T. fp32 matmul is exact while |partial sums| < 2**24, i.e. D <= 132k."""
    if q.shape[-1] > 132_000:
        raise ValueError("int_matmul: reduction dimension too large for exact fp32 accumulation")
    return (q.float() @ ternary.float().t()).round().to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def ternarize_absmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean: beta = mean|W|, T = clip(round(W / beta), -1, 1).

    Computed as W * (1 / beta), the way transformers' WeightQuant does, so ties round identically.
    Returns (T as int8 [N, D], beta as float32 scalar tensor).
    """
    w = w.float()
    beta = w.abs().mean().clamp(min=WEIGHT_EPS)
    t = torch.round(w * (1.0 / beta)).clamp(-1, 1).to(torch.int8)
    return t, beta


# ---------------------------------------------------------------------------------------------
# Hugging Face BitNet offline packing (read by the converter only)
# ---------------------------------------------------------------------------------------------


def unpack_hf_bitnet(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """transformers' BitNet layout: uint8 [N/4, D]; byte [r, c] holds rows r, r+N/4, r+N/2, r+3N/4 at bits
    0-1, 2-3, 4-5, 6-7, as value + 1. Returns int8 [N, D]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected a 2-D uint8 packed BitNet weight, got {packed.dtype} {tuple(packed.shape)}")
    p = packed.to(torch.int16)
    parts = [((p >> (2 * j)) & 3) - 1 for j in range(4)]
    full = torch.cat(parts, dim=0).to(torch.int8)
    if out_features is not None:
        if out_features > full.shape[0]:
            raise ValueError(f"packed weight holds {full.shape[0]} rows, fewer than out_features={out_features}")
        full = full[:out_features]
    return full
