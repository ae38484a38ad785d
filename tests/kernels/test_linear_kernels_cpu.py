"""CPU-side checks of the ternary-linear wrappers: every bad input is rejected with a clear error
before any kernel (or GPU) is touched, and the column-info map agrees with packing.column_map."""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.kernels import linear as lk
from qsparse_infer import packing


def cpu_weight(sizes=(40, 24), layout="concat", d=32) -> lk.PackedTernary:
    segs = [torch.randint(-1, 2, (n, d), dtype=torch.int8) for n in sizes]
    return lk.PackedTernary(packing.pack_ternary(segs, layout), torch.ones(len(sizes)), sizes, layout)


@pytest.mark.parametrize("sizes,layout", [([5, 3], "concat"), ([45, 13, 13], "concat"), ([37, 37], "interleave")])
def test_column_info_matches_column_map(sizes, layout):
    info = lk.column_info(sizes, layout).long()
    cmap = packing.column_map(sizes, layout)
    assert torch.equal(torch.where(info >= 0, info & 0xFFFFFF, -1), cmap)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    seg = info[info >= 0] >> 24
    logical = cmap[info >= 0]
    for s, n in enumerate(sizes):  # each segment's columns are exactly its own logical outputs
        local = logical[seg == s] - starts[s]
        assert torch.equal(local.sort().values, torch.arange(n))


def test_packed_ternary_validation():
    w = cpu_weight()
    assert (w.in_features, w.out_features) == (32, 64)
    with pytest.raises(ValueError, match="packed must be uint8"):
        lk.PackedTernary(w.packed[:, :-1].contiguous(), w.scales, (40, 24))
    with pytest.raises(ValueError, match="packed must be uint8"):
        lk.PackedTernary(w.packed.to(torch.int8), w.scales, (40, 24))
    with pytest.raises(ValueError, match="scales"):
        lk.PackedTernary(w.packed, torch.ones(3), (40, 24))
    with pytest.raises(ValueError, match="scales"):
        lk.PackedTernary(w.packed, torch.ones(2, dtype=torch.float64), (40, 24))
    with pytest.raises(ValueError, match="layout"):
        lk.PackedTernary(w.packed, w.scales, (40, 24), "zigzag")
    with pytest.raises(ValueError, match="exactly 2 segments"):
        lk.PackedTernary(w.packed, torch.ones(1), (64,), "interleave")
    with pytest.raises(ValueError, match="positive"):
        lk.PackedTernary(w.packed, w.scales, (0, 64))


def test_ternary_linear_validation_without_gpu():
    w = cpu_weight()
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="PackedTernary"):
        lk.ternary_linear(x, w.packed, 8)
    with pytest.raises(ValueError, match="2-D"):
        lk.ternary_linear(x[0], w, 8)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        lk.ternary_linear(x.half(), w, 8)
    with pytest.raises(ValueError, match="contiguous"):
        lk.ternary_linear(torch.randn(32, 2).t(), w, 8)
    with pytest.raises(ValueError, match="in_features=32"):
        lk.ternary_linear(torch.randn(2, 31), w, 8)
    with pytest.raises(ValueError, match="at least one token"):
        lk.ternary_linear(torch.randn(0, 32), w, 8)
    for bad_k in (0, 33, -1):
        with pytest.raises(ValueError, match=f"k={bad_k} out of range"):
            lk.ternary_linear(x, w, bad_k)
    with pytest.raises(TypeError, match="k must be an int"):
        lk.ternary_linear(x, w, 8.0)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        lk.ternary_linear(x, w, 8, norm_weight=torch.ones(31))
    with pytest.raises(ValueError, match="norm_weight must have dtype"):
        lk.ternary_linear(x, w, 8, norm_weight=torch.ones(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="interleave"):
        lk.ternary_linear(x, w, 8, glu="relu2")
    with pytest.raises(ValueError, match="glu must be"):
        lk.ternary_linear(x, w, 8, glu="gelu")
    with pytest.raises(ValueError, match="residual must have shape"):
        lk.ternary_linear(x, w, 8, residual=torch.zeros(2, 63))
    with pytest.raises(ValueError, match="out must have dtype"):
        lk.ternary_linear(x, w, 8, out=torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        lk.ternary_linear(x, w, 8)
    wi = cpu_weight((40, 40), "interleave")
    with pytest.raises(ValueError, match="out must have shape"):
        lk.ternary_linear(x, wi, 8, glu="silu", out=torch.zeros(2, 80))
    with pytest.raises(ValueError, match="cannot be combined"):
        lk.ternary_linear(x, wi, 8, glu="silu", residual=torch.zeros(2, 40))


def test_quantize_topk_and_pack_validation_without_gpu():
    with pytest.raises(ValueError, match="k=0 out of range"):
        lk.quantize_topk(torch.randn(2, 16), 0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        lk.quantize_topk(torch.randn(2, 16), 4)
    with pytest.raises(ValueError, match="supported 1..49152"):
        lk.quantize_topk(torch.zeros(1, 49153), 4)
    with pytest.raises(ValueError, match="segment 0 must be int8"):
        lk.pack_ternary_gpu([torch.zeros(4, 4, dtype=torch.int16)])
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        lk.pack_ternary_gpu([torch.zeros(4, 4, dtype=torch.int8)])
    with pytest.raises(ValueError, match="packed must be uint8"):
        lk.unpack_ternary_gpu(torch.zeros(4, 3, dtype=torch.uint8), [16])
