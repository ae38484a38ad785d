"""Packing: the engine layout round-trips bit-exactly; HF BitNet unpacking agrees with independent decoders."""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.packing import (LAYOUT_CONCAT, LAYOUT_INTERLEAVE, column_map, pack_ternary, packed_columns,
        unpack_ternary)
from qsparse_infer.model.quant import unpack_hf_bitnet


def _ternary(n, d, g):
    return torch.randint(-1, 2, (n, d), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("sizes, d, layout", [
    ([37, 5, 5], 13, LAYOUT_CONCAT), ([1], 1, LAYOUT_CONCAT), ([64, 16, 16], 64, LAYOUT_CONCAT),
    ([113], 77, LAYOUT_CONCAT), ([33, 33], 9, LAYOUT_INTERLEAVE), ([96, 96], 64, LAYOUT_INTERLEAVE),
    ([7, 7], 3, LAYOUT_INTERLEAVE),
])
def test_pack_round_trip(sizes, d, layout):
    g = torch.Generator().manual_seed(sum(sizes) + d)
    segs = [_ternary(n, d, g) for n in sizes]
    packed = pack_ternary(segs, layout)
    assert packed.dtype == torch.uint8 and packed.shape == (d, packed_columns(sizes, layout) // 4)
    assert packed.shape[1] % 16 == 0  # rows 16-byte aligned
    assert torch.equal(unpack_ternary(packed, sizes, layout), torch.cat(segs))


def test_packed_layout_by_hand():
    """Decode the bits with a plain loop: byte [k, b] holds packed columns 4b..4b+3 at bits 0-1, 2-3, 4-5, 6-7."""
    g = torch.Generator().manual_seed(0)
    sizes = [20, 20]
    segs = [_ternary(n, 5, g) for n in sizes]
    full = torch.cat(segs)
    for layout in (LAYOUT_CONCAT, LAYOUT_INTERLEAVE):
        packed = pack_ternary(segs, layout)
        cmap = column_map(sizes, layout).tolist()
        for k in range(5):
            for col, n in enumerate(cmap):
                code = (int(packed[k, col // 4]) >> (2 * (col % 4))) & 3
                assert code == (1 if n < 0 else int(full[n, k]) + 1)
    # interleave puts gate[0:16] then up[0:16] then gate[16:20] (+pad) then up[16:20] (+pad)
    cmap = column_map(sizes, LAYOUT_INTERLEAVE).tolist()
    assert cmap[:16] == list(range(16)) and cmap[16:32] == list(range(20, 36))
    assert cmap[32:36] == [16, 17, 18, 19] and cmap[36:48] == [-1] * 12 and cmap[48:52] == [36, 37, 38, 39]


def test_pack_rejects_non_ternary():
    with pytest.raises(ValueError, match="outside"):
        pack_ternary([torch.full((4, 4), 2, dtype=torch.int8)])


def _loop_unpack_hf(packed: torch.Tensor) -> torch.Tensor:
    rows, d = packed.shape
    out = torch.empty((4 * rows, d), dtype=torch.int8)
    for r in range(rows):
        for c in range(d):
            byte = int(packed[r, c])
            for j in range(4):
                out[r + j * rows, c] = ((byte >> (2 * j)) & 3) - 1
    return out


@pytest.mark.parametrize("n, d", [(8, 3), (36, 7), (64, 16)])
def test_hf_unpack_matches_transformers_and_loop(n, d):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    g = torch.Generator().manual_seed(n * d)
    t = _ternary(n, d, g)
    packed = pack_weights(t.clone())  # transformers' own packing
    assert packed.shape == (n // 4, d)
    mine = unpack_hf_bitnet(packed, n)
    assert torch.equal(mine, t)
    assert torch.equal(mine, _loop_unpack_hf(packed))
    assert torch.equal(mine.float(), unpack_weights(packed, dtype=torch.float32))
