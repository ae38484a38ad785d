"""The engine format's ternary packing: the layout contract between the engine file and the kernels.

It sits below both `model/` (the file format writes and checks it) and `kernels/` (the GEMV/GEMM wrappers
build their column maps from it), so that neither of those layers imports the other.
"""
from __future__ import annotations

import torch

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
