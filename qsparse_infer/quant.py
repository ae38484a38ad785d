"""The quantization math (the spec every kernel must match) and the ternary packing of the engine format.

BitLinear, as Q-Sparse runs it at inference, for one token x of D channels and K = topk_count(D, S):
  gamma = max(max|x|, 1e-5)                      # per-token absmax
  q     = clip(round_half_even(x * (127 / gamma)), -128, 127)   # int8, in fp32 arithmetic
  keep the K channels of largest |x| (ties: the lower index wins), zero the rest
  acc   = sum_k q[k] * T[n, k]                    # int32, exact
  y[n]  = acc * (gamma * beta / 127)              # beta: the per-tensor absmean weight scale
The largest |x| is always kept (K >= 1), so quantizing before or after the mask gives the same scale.
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


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |x| along the last dim, ascending. Ties go to the lower index.

    A stable descending sort keeps equal keys in index order, which is exactly the tie rule.
    """
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"k={k} out of range for dimension {x.shape[-1]}")
    keys = x.float().abs()
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the channels topk_indices keeps."""
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k == x.shape[-1]:
        return mask.fill_(True)
    return mask.scatter_(-1, topk_indices(x, k), True)


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
# Engine-format packing (format version 1)
#
# A projection group (q|k|v, gate/up, o, down) is stored as one uint8 matrix [D, Npad/4]: one row per
# *input* channel, so the K channels a token selects are K contiguous runs of bytes. Byte [k, b] holds
# packed columns 4b..4b+3 at bits 0-1, 2-3, 4-5, 6-7, each as code = t + 1 (0, 1, 2).
# Column space: each segment is padded with zero weights to a multiple of SEGMENT_ALIGN columns, and
#  - "concat": segments follow each other (q|k|v);
#  - "interleave": two equal segments alternate in blocks of SEGMENT_ALIGN (gate/up), so a pair
#    (gate[n], up[n]) always lands in the same tile of the kernel.
# The total is padded to a multiple of ROW_ALIGN columns so every row is 16-byte aligned.
# ---------------------------------------------------------------------------------------------

SEGMENT_ALIGN = 16
ROW_ALIGN = 64
LAYOUT_CONCAT = "concat"
LAYOUT_INTERLEAVE = "interleave"


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def packed_columns(segment_sizes: list[int], layout: str) -> int:
    """Npad: the number of packed columns (a multiple of ROW_ALIGN)."""
    padded = [_round_up(n, SEGMENT_ALIGN) for n in segment_sizes]
    if layout == LAYOUT_INTERLEAVE and len(set(padded)) != 1:
        raise ValueError(f"interleaved segments must have equal sizes, got {segment_sizes}")
    return _round_up(sum(padded), ROW_ALIGN)


def column_map(segment_sizes: list[int], layout: str) -> torch.Tensor:
    """For each packed column, the logical output index (segments concatenated), or -1 for padding."""
    if layout not in (LAYOUT_CONCAT, LAYOUT_INTERLEAVE):
        raise ValueError(f"unknown packing layout {layout!r}")
    npad = packed_columns(segment_sizes, layout)
    out = torch.full((npad,), -1, dtype=torch.int64)
    starts = [sum(segment_sizes[:i]) for i in range(len(segment_sizes))]
    if layout == LAYOUT_CONCAT:
        col = 0
        for start, n in zip(starts, segment_sizes):
            out[col:col + n] = torch.arange(start, start + n)
            col += _round_up(n, SEGMENT_ALIGN)
    else:
        nseg = len(segment_sizes)
        seg_padded = _round_up(segment_sizes[0], SEGMENT_ALIGN)
        for c in range(seg_padded * nseg):
            block, lane = divmod(c, SEGMENT_ALIGN)
            seg, blk = block % nseg, block // nseg
            local = blk * SEGMENT_ALIGN + lane
            if local < segment_sizes[seg]:
                out[c] = starts[seg] + local
    return out


def pack_ternary(segments: list[torch.Tensor], layout: str = LAYOUT_CONCAT) -> torch.Tensor:
    """Pack ternary segments (each [N_s, D], values in {-1,0,1}, torch Linear layout) into [D, Npad/4] uint8."""
    if not segments:
        raise ValueError("pack_ternary needs at least one segment")
    d = segments[0].shape[1]
    for s in segments:
        if s.dim() != 2 or s.shape[1] != d:
            raise ValueError(f"all segments must be 2-D with the same input dim {d}, got {tuple(s.shape)}")
    full = torch.cat([s.to(torch.int8) for s in segments], dim=0)  # [N, D]
    if full.numel() and (full.min() < -1 or full.max() > 1):
        raise ValueError("pack_ternary: values outside {-1, 0, 1}")
    cmap = column_map([s.shape[0] for s in segments], layout)
    codes = torch.ones((d, cmap.numel()), dtype=torch.uint8)  # code 1 == weight 0 (padding)
    valid = cmap >= 0
    codes[:, valid] = (full[cmap[valid]].t() + 1).to(torch.uint8)
    c = codes.view(d, -1, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()


def unpack_ternary(packed: torch.Tensor, segment_sizes: list[int], layout: str = LAYOUT_CONCAT) -> torch.Tensor:
    """Inverse of pack_ternary: [D, Npad/4] uint8 -> [sum(segment_sizes), D] int8 (concatenated segments)."""
    cmap = column_map(segment_sizes, layout)
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] * 4 != cmap.numel():
        raise ValueError(
            f"packed tensor must be uint8 [D, {cmap.numel() // 4}], got {packed.dtype} {tuple(packed.shape)}")
    p = packed.to(torch.int16)
    codes = torch.stack([(p >> (2 * j)) & 3 for j in range(4)], dim=-1).reshape(packed.shape[0], -1)
    if (codes == 3).any():
        raise ValueError("packed ternary data contains the invalid code 3 (corrupt file?)")
    vals = (codes - 1).to(torch.int8)  # [D, Npad]
    valid = cmap >= 0
    out = torch.empty((sum(segment_sizes), packed.shape[0]), dtype=torch.int8)
    out[cmap[valid]] = vals[:, valid].t()
    return out


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
