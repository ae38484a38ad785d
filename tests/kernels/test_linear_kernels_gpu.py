"""GPU tests of the ternary-linear kernels against quant.py (the spec).

What is bit-exact: packing; selected indices, int8 values and gamma on un-normed inputs; the int32
accumulators (raw, per packed column) always; the plain / residual / relu2 outputs given equal
gamma (same fp32 op sequence, no FMA contraction). What has a tolerance: SiLU (expf), and anything
downstream of the fused RMSNorm (the sum of squares is ordered differently from torch), where
selections may differ from the CPU reference only at near-ties.
"""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.kernels import linear as lk
from qsparse_infer import packing
from qsparse_infer.model import quant
from qsparse_infer.model.config import topk_count

pytestmark = pytest.mark.gpu
SPARSITIES = [0.0, 0.25, 0.5, 0.6, 0.9]
DEV = "cuda"


def make_x(t: int, d: int, kind: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if kind == "randn":
        # per-channel spread like real activations (a few large channels)
        x = torch.randn(t, d, generator=gen) * (0.2 + torch.rand(d, generator=gen) * 3)
    elif kind == "ties":
        x = torch.randint(-4, 5, (t, d), generator=gen).float() * 0.75
    elif kind == "zero_token":
        x = torch.randn(t, d, generator=gen)
        x[0] = 0
    else:
        raise AssertionError(kind)
    return x.to(dtype).to(DEV)


def make_ternary(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (n, d), generator=gen, dtype=torch.int8)


def k_of(d: int, s: float) -> int:
    return max(1, topk_count(d, s))


def ref_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.float().cpu()
    if w is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float().cpu()


def logical_acc(raw: torch.Tensor, w: lk.PackedTernary) -> torch.Tensor:
    """Raw per-packed-column accumulators -> [T, N] in logical order; padding columns must be 0."""
    info = w.colinfo.cpu().long()
    raw = raw.cpu()
    valid = info >= 0
    assert torch.all(raw[:, ~valid] == 0), "padding columns accumulated something"
    out = torch.empty((raw.shape[0], w.out_features), dtype=torch.int32)
    out[:, info[valid] & 0xFFFFFF] = raw[:, valid]
    return out


def ref_outputs(acc: torch.Tensor, gamma: torch.Tensor, betas: list[float], sizes: list[int]) -> torch.Tensor:
    cols = []
    start = 0
    for b, n in zip(betas, sizes):
        beta = torch.tensor(b, dtype=torch.float32)
        cols.append(acc[:, start:start + n].float() * (gamma.reshape(-1, 1).cpu() * beta / 127.0))
        start += n
    return torch.cat(cols, dim=1)


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,layout,d", [([37], "concat", 53), ([45, 13, 13], "concat", 91),
                                              ([45, 45], "interleave", 91), ([130, 130], "interleave", 7)])
def test_pack_unpack_bit_exact(sizes, layout, d):
    gen = torch.Generator().manual_seed(1)
    segs = [make_ternary(n, d, gen) for n in sizes]
    ref = packing.pack_ternary(segs, layout)
    got = lk.pack_ternary_gpu([s.to(DEV) for s in segs], layout)
    assert torch.equal(got.cpu(), ref)
    back = lk.unpack_ternary_gpu(ref.to(DEV), sizes, layout)
    assert torch.equal(back.cpu(), torch.cat(segs))


def test_pack_unpack_reject_bad_values():
    bad = torch.full((16, 8), 2, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="outside"):
        lk.pack_ternary_gpu([bad])
    corrupt = torch.full((8, 16), 0xFF, dtype=torch.uint8, device=DEV)  # [D, Npad/4] for one 16-col segment
    with pytest.raises(ValueError, match="code 3"):
        lk.unpack_ternary_gpu(corrupt, [16])


# ------------------------------------------------------------------------------------------------
# quantize + top-K
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 997, 2560, 2563])  # 2560: the vectorized row loads
@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("kind", ["randn", "ties", "zero_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [256, 1024])
def test_quantize_topk_bit_exact(d, s, kind, dtype, threads):
    """Both CTA sizes of the select kernel (1024 threads for few tokens, 256 for many) against quant.py."""
    gen = torch.Generator().manual_seed(d * 7 + int(s * 100))
    t = 5
    x = make_x(t, d, kind, gen, dtype)
    k = k_of(d, s)
    idx, q, gamma = lk.quantize_topk(x, k, _threads=threads)
    xr = x.float().cpu()
    ref_idx = quant.topk_indices(xr, k)
    qf, ref_gamma = quant.quantize_int8(xr)
    assert torch.equal(idx.cpu().long(), ref_idx)
    assert torch.equal(q.cpu(), qf.gather(1, ref_idx))
    assert torch.equal(gamma.cpu(), ref_gamma.reshape(-1))


@pytest.mark.parametrize("d,s", [(2560, 0.6), (6912, 0.0), (1283, 0.9)])
def test_quantize_topk_many_tokens(d, s):
    """Past 2 tokens per SM the select kernel runs 256-thread CTAs (several rows per SM): 300 rows, ties mixed
    in, bit-exact against quant.py and equal, with the norm fused, to the 1024-thread CTAs bit for bit."""
    gen = torch.Generator().manual_seed(d + 300)
    x = make_x(300, d, "randn", gen)
    x[5::11] = make_x(1, d, "ties", gen)
    k = k_of(d, s)
    idx, q, gamma = lk.quantize_topk(x, k)
    ref_idx = quant.topk_indices(x.cpu(), k)
    qf, ref_gamma = quant.quantize_int8(x.cpu())
    assert torch.equal(idx.cpu().long(), ref_idx)
    assert torch.equal(q.cpu(), qf.gather(1, ref_idx))
    assert torch.equal(gamma.cpu(), ref_gamma.reshape(-1))
    w = (torch.rand(d, generator=gen) + 0.5).to(DEV)
    normed = [lk.quantize_topk(x, k, norm_weight=w, _threads=n) for n in (256, 1024)]
    for a, b in zip(*normed):
        assert torch.equal(a, b)


def test_quantize_topk_large_d():
    gen = torch.Generator().manual_seed(3)
    x = make_x(2, 28672, "randn", gen)
    k = k_of(28672, 0.6)
    idx, q, gamma = lk.quantize_topk(x, k)
    ref_idx = quant.topk_indices(x.cpu(), k)
    assert torch.equal(idx.cpu().long(), ref_idx)
    assert torch.equal(q.cpu(), quant.quantize_int8(x.cpu())[0].gather(1, ref_idx))


def assert_near_tie_selection(sel: torch.Tensor, xn: torch.Tensor, k: int, rtol: float = 1e-5) -> None:
    """sel (GPU, normed inside the kernel) vs the CPU reference on xn: equal except at near-ties."""
    ref = quant.topk_indices(xn, k)
    keys = xn.abs()
    for row in range(xn.shape[0]):
        a, b = set(sel[row].tolist()), set(ref[row].tolist())
        diff = a ^ b
        assert len(diff) <= max(2, k // 100), f"token {row}: {len(diff)} selections differ"
        if diff:
            kth = keys[row, ref[row]].min()
            for i in diff:
                assert abs(keys[row, i] - kth) <= rtol * kth + 1e-12, f"token {row}: channel {i} is not a near-tie"


@pytest.mark.parametrize("d,s", [(997, 0.5), (2560, 0.6), (6912, 0.9), (4099, 0.0)])
def test_quantize_topk_norm_fused(d, s):
    gen = torch.Generator().manual_seed(d)
    x = make_x(4, d, "randn", gen)
    w = (torch.rand(d, generator=gen) + 0.5).to(DEV)
    k = k_of(d, s)
    idx, q, gamma = lk.quantize_topk(x, k, norm_weight=w, eps=1e-5)
    xn = ref_norm(x, w, 1e-5)
    ref_gamma = quant.absmax_gamma(xn).reshape(-1)
    torch.testing.assert_close(gamma.cpu(), ref_gamma, rtol=1e-5, atol=0)
    assert_near_tie_selection(idx.cpu().long(), xn, k)
    assert torch.all(idx[:, 1:] > idx[:, :-1]), "indices must be strictly ascending"


# ------------------------------------------------------------------------------------------------
# GEMV / GEMM
# ------------------------------------------------------------------------------------------------


def build(sizes, layout, d, gen, betas=None):
    segs = [make_ternary(n, d, gen) for n in sizes]
    betas = betas or [float(0.5 + torch.rand(1, generator=gen)) for _ in sizes]
    return lk.PackedTernary.from_ternary(segs, betas, layout, DEV), torch.cat(segs), betas


def run_linear(x, w, k, **kw):
    t = x.shape[0]
    raw = torch.full((t, w.npad), 0x5A5A5A5A, dtype=torch.int32, device=DEV)  # poison
    n_out = w.segment_sizes[0] if kw.get("glu") else w.out_features
    if kw.get("out") is None and kw.get("residual") is None:
        kw["out"] = torch.full((t, n_out), float("nan"), device=DEV)  # poison
    y = lk.ternary_linear(x, w, k, _raw_acc=raw, **kw)
    return y, raw


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("t", [1, 2, 5, 8])
@pytest.mark.parametrize("variant", ["fused", "split"])
def test_gemv_exact(s, t, variant):
    gen = torch.Generator().manual_seed(int(s * 1000) + t)
    d, sizes = 997, [333, 77, 77]  # odd D and M, three concat segments (q|k|v-like)
    w, full, betas = build(sizes, "concat", d, gen)
    x = make_x(t, d, "ties" if t == 2 else ("zero_token" if t == 5 else "randn"), gen)
    k = k_of(d, s)
    y, raw = run_linear(x, w, k, _variant=variant)
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    ref = ref_outputs(acc, gamma, betas, sizes)
    assert not torch.isnan(y).any(), "unwritten outputs"
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("kind", ["randn", "ties", "zero_token"])
@pytest.mark.parametrize("d,sizes,r", [(997, [333, 77, 77], None), (997, [333, 77, 77], 1), (97, [45], 2),
                                       (2560, [2560, 640, 640], 16), (6912, [1031], None), (9001, [515], None),
                                       (9001, [515], 4)])
@pytest.mark.parametrize("variant", ["t1", "t1p"])
def test_gemv_t1_exact(s, kind, d, sizes, r, variant):
    """The one-token kernels (variant 2, and variant 3 with its rows prefetched into shared memory): exact
    int32 sums and outputs for 1 <= k <= D, odd sizes, both register layouts (256 threads up to D = 8192,
    1024 above: variant 2 only), and any cluster size R."""
    if variant == "t1p" and d > 8192:
        pytest.skip("variant 3 serves D <= 8192")
    gen = torch.Generator().manual_seed(int(s * 1000) + d + len(kind))
    w, full, betas = build(sizes, "concat", d, gen)
    x = make_x(1, d, kind, gen, torch.bfloat16 if d == 6912 else torch.float32)
    k = max(1, k_of(d, s))
    y, raw = run_linear(x, w, k, _variant=variant, _shape=None if r is None else (0, r))
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    assert not torch.isnan(y).any(), "unwritten outputs"
    assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, sizes))


@pytest.mark.parametrize("glu", ["relu2", "silu"])
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("variant", ["t1", "t1p"])
def test_gemv_t1_glu_residual(glu, r, variant):
    gen = torch.Generator().manual_seed(5 + r)
    d, m = 1283, 700
    w, full, betas = build([m, m], "interleave", d, gen)
    x = make_x(1, d, "randn", gen)
    k = k_of(d, 0.6)
    y, raw = run_linear(x, w, k, glu=glu, _variant=variant, _shape=(0, r))
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    gu = ref_outputs(acc, gamma, betas, [m, m])
    g, u = gu[:, :m], gu[:, m:]
    ref = torch.relu(g).square() * u if glu == "relu2" else torch.nn.functional.silu(g) * u
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5 if glu == "silu" else 0, atol=1e-6 if glu == "silu" else 0)
    w2, full2, betas2 = build([m], "concat", d, gen)
    res = torch.randn(1, m, generator=gen).to(DEV)
    res_ref = res.cpu().clone()
    lk.ternary_linear(x, w2, k, residual=res, out=res, _variant=variant, _shape=(0, r))
    ref2 = res_ref + ref_outputs(quant.int_matmul(q, full2), gamma, betas2, [m])
    assert torch.equal(res.cpu(), ref2)


@pytest.mark.parametrize("d,n,s,variant", [(2560, 3840, 0.6, "fused"), (8192, 1000, 0.6, "fused"),
                                           (8192, 1000, 0.6, "split"), (28672, 200, 0.6, "split"),
                                           (6912, 2560, 0.0, None), (2563, 1031, 0.9, None)])
def test_gemv_shapes(d, n, s, variant):
    gen = torch.Generator().manual_seed(d + n)
    w, full, betas = build([n], "concat", d, gen)
    x = make_x(3, d, "randn", gen, torch.bfloat16)
    k = k_of(d, s)
    y, raw = run_linear(x, w, k, _variant=variant)
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, [n]))


@pytest.mark.parametrize("t", [1, 4, 37])
@pytest.mark.parametrize("glu", ["relu2", "silu"])
def test_glu_epilogue(t, glu):
    gen = torch.Generator().manual_seed(t)
    d, m = 611, 301
    w, full, betas = build([m, m], "interleave", d, gen)
    x = make_x(t, d, "randn", gen)
    k = k_of(d, 0.6)
    y, raw = run_linear(x, w, k, glu=glu)
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    gu = ref_outputs(acc, gamma, betas, [m, m])
    g, u = gu[:, :m], gu[:, m:]
    ref = torch.relu(g).square() * u if glu == "relu2" else torch.nn.functional.silu(g) * u
    assert y.shape == (t, m)
    if glu == "relu2":
        assert torch.equal(y.cpu(), ref)
    else:
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 8, 37])
def test_residual_epilogue_aliased(t):
    gen = torch.Generator().manual_seed(100 + t)
    d, n = 1031, 513
    w, full, betas = build([n], "concat", d, gen)
    x = make_x(t, d, "randn", gen)
    res = torch.randn(t, n, generator=gen).to(DEV)
    res_ref = res.cpu().clone()
    k = k_of(d, 0.5)
    y = lk.ternary_linear(x, w, k, residual=res, out=res)
    assert y.data_ptr() == res.data_ptr()
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    ref = res_ref + ref_outputs(quant.int_matmul(q, full), gamma, betas, [n])
    assert torch.equal(res.cpu(), ref)


@pytest.mark.parametrize("t,s,variant", [(37, 0.0, None), (37, 0.6, None), (70, 0.25, None), (9, 0.9, None),
                                         (70, 0.6, "skinny"), (37, 0.6, "tiled"), (1, 0.0, "skinny"),
                                         (16, 0.6, "skinny"), (17, 0.0, "skinny"), (64, 0.6, "skinny"),
                                         (70, 0.6, "prefill"), (200, 0.0, "prefill"), (131, 0.9, None)])
def test_gemm_exact(t, s, variant):
    """The GEMM variants (skinny by default up to 64 tokens, prefill above, tiled when asked) give the exact
    int32 sums."""
    gen = torch.Generator().manual_seed(t * 3)
    d, sizes = 997, [333, 77, 77]
    w, full, betas = build(sizes, "concat", d, gen)
    x = make_x(t, d, "zero_token", gen)
    x[1::7] = make_x(1, d, "ties", gen)  # some tie-heavy tokens
    k = k_of(d, s)
    y, raw = run_linear(x, w, k, _path="gemm", _variant=variant)
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    assert not torch.isnan(y).any()
    assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, sizes))


@pytest.mark.parametrize("d,sizes,layout", [(2560, [2560, 640, 640], "concat"), (6912, [2560], "concat"),
                                             (2560, [6912, 6912], "interleave"), (31, [13], "concat"),
                                             (4100, [129], "concat")])
@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("t", [2, 16, 33])
def test_gemm_skinny_shapes(d, sizes, layout, splits, t):
    """GEMM variant 2 at the 2B4T shapes and odd ones (D not a multiple of 32, a partial 128-column tile, a
    partial token group), every split count: exact int32 against the reference, outputs poisoned first."""
    gen = torch.Generator().manual_seed(d + t + (splits or 0))
    w, full, betas = build(sizes, layout, d, gen)
    x = make_x(t, d, "randn", gen)
    k = k_of(d, 0.6)
    shape = None if splits is None else (0, splits)
    y, raw = run_linear(x, w, k, _variant="skinny", _shape=shape)
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    if layout == "concat":
        assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, sizes))


@pytest.mark.parametrize("d,sizes,layout", [(2560, [2560, 640, 640], "concat"), (6912, [2560], "concat"),
                                             (2560, [700, 700], "interleave"), (31, [13], "concat"),
                                             (4100, [129], "concat"), (997, [333, 77, 77], "concat")])
@pytest.mark.parametrize("tile", [None, 64, 128])
@pytest.mark.parametrize("t", [1, 65, 130, 257])
def test_gemm_prefill_shapes(d, sizes, layout, tile, t):
    """GEMM variant 3 at the 2B4T shapes and odd ones: D not a multiple of its 64-row k step (31: one partial
    step), a last 128-column tile half past the matrix (129 -> 192 packed columns), token counts that leave a
    partial token tile of either size, one token in a 128-token tile. Exact int32 against the reference,
    outputs and accumulators poisoned first; plain outputs bit-exact too."""
    gen = torch.Generator().manual_seed(7 * d + t + (tile or 0))
    w, full, betas = build(sizes, layout, d, gen)
    x = make_x(t, d, "randn", gen)
    if t > 7:
        x[3::7] = make_x(1, d, "ties", gen)
    k = k_of(d, 0.6)
    y, raw = run_linear(x, w, k, _variant="prefill", _shape=None if tile is None else (0, tile))
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    if layout == "concat":
        assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, sizes))


@pytest.mark.parametrize("glu", ["relu2", "silu", None])
@pytest.mark.parametrize("tile", [64, 128])
def test_gemm_prefill_epilogues(glu, tile):
    """The GLU epilogues (gate and up columns 16 apart inside one 128-column tile) and the residual epilogue
    written in place, through variant 3, on dense inputs (k = D: every |q| up to 127 over all 6912 rows of
    2B4T's down, the widest sums): exact int32, bit-exact plain / residual / relu2 outputs, SiLU within expf's
    rounding."""
    gen = torch.Generator().manual_seed(500 + tile + len(glu or ""))
    t = 150
    if glu is None:
        d, n = 6912, 2560
        w, full, betas = build([n], "concat", d, gen)
        x = make_x(t, d, "randn", gen)
        q, gamma = quant.quantize_sparse_int8(x.cpu(), d)
        res = torch.randn(t, n, generator=gen).to(DEV)
        ref = res.cpu() + ref_outputs(quant.int_matmul(q, full), gamma, betas, [n])
        y = lk.ternary_linear(x, w, d, residual=res, out=res, _variant="prefill", _shape=(0, tile))
        assert y.data_ptr() == res.data_ptr()
        assert torch.equal(res.cpu(), ref)
        return
    d, m = 2560, 700
    w, full, betas = build([m, m], "interleave", d, gen)
    x = make_x(t, d, "randn", gen)
    y, raw = run_linear(x, w, d, glu=glu, _variant="prefill", _shape=(0, tile))
    q, gamma = quant.quantize_sparse_int8(x.cpu(), d)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    gu = ref_outputs(acc, gamma, betas, [m, m])
    g, u = gu[:, :m], gu[:, m:]
    ref = torch.relu(g).square() * u if glu == "relu2" else torch.nn.functional.silu(g) * u
    if glu == "relu2":
        assert torch.equal(y.cpu(), ref)
    else:
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-6)


def test_gemm_prefill_plan_and_bad_shape():
    """The default GEMM takes variant 3 where its grid fills the card (2B4T's gate_up from 64 tokens), variant 2
    below; every GEMM variant gives each row the same bits; a tile other than 64 or 128 tokens is refused."""
    gen = torch.Generator().manual_seed(3)
    d = 2560
    w, _, _ = build([6912, 6912], "interleave", d, gen)
    dev = torch.device(DEV)
    assert lk.plan_gemm(w, lk.PREFILL_MIN_TOKENS - 1, dev)[0] == 2
    assert lk.plan_gemm(w, lk.PREFILL_MIN_TOKENS, dev) == (3, 64)
    small, _, _ = build([640], "concat", d, gen)
    assert lk.plan_gemm(small, lk.PREFILL_MIN_TOKENS, dev)[0] == 2  # 5 column tiles: not enough CTAs
    x = make_x(lk.PREFILL_MIN_TOKENS, d, "randn", gen)
    k = k_of(d, 0.6)
    outs = {v: run_linear(x, w, k, _variant=v) for v in ("skinny", "prefill", "tiled")}
    outs["default"] = run_linear(x, w, k)
    for name, (y, raw) in outs.items():
        assert torch.equal(raw, outs["skinny"][1]), name
        assert torch.equal(y, outs["skinny"][0]), name
    with pytest.raises(ValueError, match="64 or 128"):
        lk.ternary_linear(x, w, k, _variant="prefill", _shape=(0, 96))


@pytest.mark.parametrize("t,variant", [(1, "fused"), (1, "t1"), (1, "t1p"), (3, "split"), (20, None)])
def test_norm_fused_linear(t, variant):
    """acc is exact w.r.t. the kernel's own selection (quantize_topk normalizes identically); the
    selection itself matches the CPU reference up to near-ties; y is close to the reference."""
    gen = torch.Generator().manual_seed(7 + t)
    d, n = 2048 + 5, 700
    w, full, betas = build([n], "concat", d, gen)
    x = make_x(t, d, "randn", gen)
    nw = (torch.rand(d, generator=gen) + 0.5).to(DEV)
    k = k_of(d, 0.6)
    y, raw = run_linear(x, w, k, norm_weight=nw, norm_eps=1e-6, _variant=variant if t <= 8 else None)
    idx, qsel, gamma = lk.quantize_topk(x, k, norm_weight=nw, eps=1e-6)
    qd = torch.zeros(t, d, dtype=torch.int8)
    qd.scatter_(1, idx.cpu().long(), qsel.cpu())
    acc = quant.int_matmul(qd, full)
    assert torch.equal(logical_acc(raw, w), acc)
    assert torch.equal(y.cpu(), ref_outputs(acc, gamma.cpu(), betas, [n]))
    xn = ref_norm(x, nw, 1e-6)
    assert_near_tie_selection(idx.cpu().long(), xn, k)
    ref = quant.bitlinear(xn, full, torch.tensor(betas[0]), k)
    err = (y.cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e} vs the CPU reference"


def test_current_stream_handle_follows_torch():
    """The raw handle the wrappers launch on is torch's current stream: the default one, a side stream inside
    `torch.cuda.stream`, and the capture stream inside `torch.cuda.graph` (where launching on another stream
    would break the capture)."""
    from qsparse_infer.kernels._ext import current_stream_handle

    assert current_stream_handle() == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert current_stream_handle() == side.cuda_stream
        assert current_stream_handle(torch.cuda.current_device()) == side.cuda_stream
    x = torch.zeros(4, device=DEV)
    g = torch.cuda.CUDAGraph()
    seen: list[tuple[int, int]] = []
    with torch.cuda.graph(g):
        seen.append((current_stream_handle(), torch.cuda.current_stream().cuda_stream))
        x.add_(1)
    assert seen[0][0] == seen[0][1]
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), torch.ones(4))


def test_repeat_and_graph_capture():
    """The split-K workspace resets itself: repeated calls and graph replays give identical results."""
    gen = torch.Generator().manual_seed(11)
    d, n = 4096, 4096
    w, full, betas = build([n], "concat", d, gen)
    k = k_of(d, 0.6)
    x = make_x(1, d, "randn", gen)
    y1 = lk.ternary_linear(x, w, k, _variant="split").clone()
    y2 = lk.ternary_linear(x, w, k, _variant="split").clone()
    assert torch.equal(y1, y2)
    out = torch.empty(1, n, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lk.ternary_linear(x, w, k, out=out)  # warm-up on the capture stream (allocates workspaces)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lk.ternary_linear(x, w, k, out=out)
    for _ in range(3):
        x.copy_(make_x(1, d, "randn", gen))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
        assert torch.equal(out.cpu(), ref_outputs(quant.int_matmul(q, full), gamma, betas, [n]))


@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("d,k", [(2560, 1024), (2560, 1), (6912, 2764), (997, 996)])
@pytest.mark.parametrize("variant", ["t1", "t1p"])
def test_gemv_t1_selection_early_exit(d, k, r, variant):
    """Inputs whose K largest magnitudes are far above the rest: the one-token kernel's bisection stops
    after a few steps (exactly K keys above a coarse threshold). Also a K-th key that is an exact power of
    two (a threshold candidate itself), where the early exit must still count it in. Exact vs quant.py."""
    gen = torch.Generator().manual_seed(d + k + r)
    w, full, betas = build([515], "concat", d, gen)
    big = torch.randperm(d, generator=gen)[:k]
    for case in ("separated", "power_of_two"):
        x = torch.rand(1, d, generator=gen) * 0.01
        if case == "separated":
            x[0, big] = 100 + torch.rand(k, generator=gen)
        else:
            x[0, big] = 2.0 + torch.rand(k, generator=gen)
            x[0, big[-1]] = 2.0  # the K-th largest is exactly 2.0 = 0x40000000
        x = (x * torch.where(torch.rand(1, d, generator=gen) < 0.5, -1.0, 1.0)).to(DEV)
        if variant == "t1p" and r == 1 and d > 1400:
            continue  # one CTA per column block would need the whole D x 128 B tile: variant 2 only
        y, raw = run_linear(x, w, k, _variant=variant, _shape=(0, r))
        q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
        acc = quant.int_matmul(q, full)
        assert torch.equal(logical_acc(raw, w), acc), case
        assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, [515])), case


def radix_edge_input(case: str, d: int, gen: torch.Generator) -> torch.Tensor:
    """|x| patterns that drive the radix selection (t1_device.cuh: passes over key bits [30:20], [19:9],
    [8:0]) into its corners."""
    if case == "low_bits":  # every key in one pass-1 and one pass-2 bin: pass 3 decides, with repeats (ties)
        bits = 0x3F800000 + torch.randint(0, 300, (1, d), generator=gen, dtype=torch.int32)
        x = bits.view(torch.float32).clone()
    elif case == "zeros":  # most keys exactly +-0: the K-th key is 0, ties among zeros by index
        x = torch.randn(1, d, generator=gen) * (torch.rand(1, d, generator=gen) < 0.2)
        x = torch.where(torch.rand(1, d, generator=gen) < 0.5, x, -x)  # -0.0 and +0.0 are the same key
    elif case == "bin_edges":  # keys on the passes' bin edges (low 20 or 9 bits zero) and just below them
        edge = torch.tensor([1.0, 1.125, 2.0, 3.0, 0.5]).view(torch.int32)
        pick = edge[torch.randint(0, 5, (1, d), generator=gen)]
        off = torch.randint(-1, 1, (1, d), generator=gen, dtype=torch.int32) * torch.tensor([1, 512, 1 << 20])[
            torch.randint(0, 3, (1, d), generator=gen)].to(torch.int32)
        x = (pick + off).view(torch.float32).clone()
    else:
        raise AssertionError(case)
    return x * torch.where(torch.rand(1, d, generator=gen) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("case", ["low_bits", "zeros", "bin_edges"])
@pytest.mark.parametrize("d,k", [(2560, 1024), (997, 3), (8000, 3200), (8000, 7999), (9000, 3600)])
@pytest.mark.parametrize("variant", ["t1", "t1p"])
def test_gemv_t1_selection_corners(case, d, k, variant):
    """The one-token kernels' selection (bisection at D <= 7168, radix select above: 256 x 32 and 1024 x 32
    values) where the radix needs its third pass, where the K-th key is zero, and where keys sit on bin edges:
    the kept set and the int32 sums exact vs quant.py (ties to the lower index)."""
    if variant == "t1p" and d > 8192:
        pytest.skip("variant 3 serves D <= 8192")
    gen = torch.Generator().manual_seed(d * 3 + k + len(case))
    w, full, betas = build([515], "concat", d, gen)
    x = radix_edge_input(case, d, gen).to(DEV)
    r = 1 if d <= 1400 else 16
    y, raw = run_linear(x, w, k, _variant=variant, _shape=(0, r))
    q, gamma = quant.quantize_sparse_int8(x.cpu(), k)
    acc = quant.int_matmul(q, full)
    assert torch.equal(logical_acc(raw, w), acc)
    assert torch.equal(y.cpu(), ref_outputs(acc, gamma, betas, [515]))


@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("variant", ["t1", "t1p"])
@pytest.mark.parametrize("s", [0.0, 0.6])
def test_gemv_t1_dependent_chain_in_graph(pdl, variant, s):
    """A chain o -> gate_up (GLU) -> down (+ residual), each reading what the previous one wrote, captured in
    one CUDA graph with programmatic dependent launch on and off: every replay equals the eager chain. A
    kernel that read its input before pdl::wait() would see the previous replay's values and fail this."""
    from qsparse_infer.kernels._ext import ext

    gen = torch.Generator().manual_seed(21)
    h, m = 1283, 700
    w_o, _, _ = build([h], "concat", h, gen)
    w_gu, _, _ = build([m, m], "interleave", h, gen)
    w_d, _, _ = build([h], "concat", m, gen)
    ko, kgu, kd = k_of(h, s), k_of(h, s), k_of(m, s)
    x = torch.empty(1, h, device=DEV)
    hid = torch.empty(1, h, device=DEV)
    mlp = torch.empty(1, m, device=DEV)

    def chain() -> None:
        lk.ternary_linear(x, w_o, ko, residual=hid, out=hid, _variant=variant, _shape=(0, 4))
        lk.ternary_linear(hid, w_gu, kgu, glu="relu2", out=mlp, _variant=variant, _shape=(0, 8))
        lk.ternary_linear(mlp, w_d, kd, residual=hid, out=hid, _variant=variant, _shape=(0, 2))

    before = ext().get_pdl()
    ext().set_pdl(pdl)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x.copy_(make_x(1, h, "randn", gen))
            hid.zero_()
            chain()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
        for i in range(4):
            x.copy_(make_x(1, h, "randn", gen))
            h0 = (torch.randn(1, h, generator=gen) * (i + 1)).to(DEV)
            hid.copy_(h0)
            g.replay()
            got_h, got_m = hid.clone(), mlp.clone()
            hid.copy_(h0)
            ext().set_pdl(False)
            chain()  # eager, no PDL: the reference order
            ext().set_pdl(pdl)
            torch.cuda.synchronize()
            assert torch.equal(got_m, mlp), i
            assert torch.equal(got_h, hid), i
    finally:
        ext().set_pdl(before)


@pytest.mark.parametrize("d,sizes,s", [(2560, [2560, 640, 640], 0.6), (6912, [2560], 0.6), (997, [333], 0.0),
                                       (1283, [700], 0.9)])
def test_fused_norm_identical_across_paths(d, sizes, s):
    """With the RMSNorm fused, the one-token kernels (t1, t1p), variant 1 (fused and split: the select kernel)
    and the GEMM path's select kernel form the sum of squares in one order, so one row gives bit-identical
    accumulators and outputs whichever path serves it: a batched decoder may mix paths per step and still
    match single-sequence decoding exactly."""
    gen = torch.Generator().manual_seed(d + len(sizes))
    w, _, _ = build(sizes, "concat", d, gen)
    x = make_x(1, d, "randn", gen)
    nw = (torch.rand(d, generator=gen) + 0.5).to(DEV)
    k = k_of(d, s)
    outs = {}
    for variant in ("t1", "t1p", "fused", "split"):
        try:
            outs[variant] = run_linear(x, w, k, norm_weight=nw, _variant=variant)
        except ValueError:  # variant 1 fused needs D's row in shared memory: not at every D
            assert variant == "fused"
    # the GEMM paths for batches whose row 0 is this token: the skinny GEMM (12 rows) and, at 300 rows, the
    # prefill GEMM behind the select kernel's 256-thread CTAs
    xb = torch.cat([x, make_x(299, d, "randn", gen)])
    outs["gemm"] = run_linear(xb[:12].contiguous(), w, k, norm_weight=nw)
    outs["gemm-300"] = run_linear(xb, w, k, norm_weight=nw)
    y0, raw0 = outs["t1"]
    for name, (y, raw) in outs.items():
        assert torch.equal(raw[:1], raw0), name
        assert torch.equal(y[:1], y0), name
