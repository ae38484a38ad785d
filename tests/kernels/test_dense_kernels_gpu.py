"""GPU tests of the bf16 top-K gather-GEMV (csrc/dense/gemv_bf16.cu, kernels/dense.py) against an fp64 reference.

What is exact: which channels are kept (ties to the lower index), on un-normed inputs; determinism (the same inputs
give the same bits, the reduction order is fixed). What has a tolerance, and which: the fp32 sums against fp64,
bounded element by element by the worst case of fp32 summation, |err| <= (K + 2) * 2^-24 * sum_k |x_k w_kn| (plus
the epilogue's own roundings), so no test depends on luck; anything behind the fused RMSNorm, whose sum of squares
is ordered differently from torch's (a near-tie there can flip one channel: random inputs make that ~1e-4 likely,
and such a test would fail loudly, not flakily pass). Output buffers are poisoned with NaN before each call.
"""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.kernels import dense as dn
from qsparse_infer.model.config import topk_count

pytestmark = pytest.mark.gpu
DEV = "cuda"
U = 2.0 ** -24


def make_x(d: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return (torch.randn(1, d, generator=gen) * (0.2 + torch.rand(d, generator=gen) * 3)).to(DEV)
    if kind == "ties":  # many equal |x|: the tie rule decides
        return (torch.randint(-4, 5, (1, d), generator=gen).float() * 0.75).to(DEV)
    if kind == "low_bits":  # |x| in [1, 1 + 300 ulp): the radix selection's third pass decides, with repeats
        bits = 0x3F800000 + torch.randint(0, 300, (1, d), generator=gen, dtype=torch.int32)
        return (bits.view(torch.float32) * torch.where(torch.rand(1, d, generator=gen) < 0.5, -1.0, 1.0)).to(DEV)
    if kind == "zeros":  # mostly +-0: the K-th key is zero
        return (torch.randn(1, d, generator=gen) * (torch.rand(1, d, generator=gen) < 0.2)).to(DEV)
    raise AssertionError(kind)


def make_w(d: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(d, n, generator=gen) / d ** 0.5).to(torch.bfloat16)


def norm_rel(d: int) -> float:
    """Worst-case relative error of one fp32 x' = x * rsqrt(mean(x^2) + eps) * w against the exact value: the sum
    of squares (d roundings), then rsqrt and two products."""
    return (d / 2 + 8) * U


def ref_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.float().cpu()
    if w is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float().cpu()


def kept(x: torch.Tensor, k: int, rescale: str) -> torch.Tensor:
    """fp64 kept values (the spec: stable sort -> ties to the lower index), with the L2 factor folded in."""
    return dn.topk_rows(x.double(), k, rescale)


def ref_product(xk: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 product and the worst-case fp32 summation bound per output column."""
    wd = w.double().cpu()
    return xk @ wd, xk.abs() @ wd.abs()


def check_close(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, k: int, rel_terms: float = 0.0) -> None:
    """rel_terms: a relative error every term may carry before the sum (the fused norm, the L2 factor)."""
    got = got.double().cpu()
    assert torch.isfinite(got).all(), "the kernel left poisoned (NaN) outputs"
    tol = ((k + 4) * U + rel_terms) * bound + 2 * U * ref.abs() + 1e-30
    err = (got - ref).abs()
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), f"column {worst}: got {got.view(-1)[worst]}, fp64 {ref.view(-1)[worst]}"


SHAPES = [(64, 96), (100, 37), (257, 515), (1000, 1001), (2048, 1536), (4096, 6144)]
SPARSITIES = [0.0, 0.3, 0.5, 0.6, 0.9]


@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_plain_matches_fp64(d, n, s, kind):
    gen = torch.Generator().manual_seed(d * 7 + n + int(100 * s))
    x = make_x(d, kind, gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    k = max(1, topk_count(d, s))
    out = torch.full((1, n), float("nan"), device=DEV)
    dn.dense_linear(x, w, k, out=out, _path="kernel")
    xk = kept(x.cpu(), k, "none")
    ref, bound = ref_product(xk, w.weight_t)
    check_close(out, ref, bound, k)


@pytest.mark.parametrize("d,n", [(1000, 1001), (4096, 600), (6000, 520), (14336, 520), (20001, 520)])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["low_bits", "zeros"])
def test_selection_corners_match_fp64(d, n, s, kind):
    """Both selections: bisection (D <= 4096) and radix select (above: 256 x 32, 512 x 32, 1024 x 28 values)."""
    gen = torch.Generator().manual_seed(d + n + int(100 * s) + len(kind))
    x = make_x(d, kind, gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    k = max(1, topk_count(d, s))
    out = torch.full((1, n), float("nan"), device=DEV)
    dn.dense_linear(x, w, k, out=out, _path="kernel")
    ref, bound = ref_product(kept(x.cpu(), k, "none"), w.weight_t)
    check_close(out, ref, bound, k)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16, 17, 33, 64])  # the last CTA sums 16 splits per chunk
def test_splits_agree_and_are_deterministic(splits):
    gen = torch.Generator().manual_seed(splits)
    d, n, k = 1500, 700, 600
    x = make_x(d, "randn", gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    a = dn.dense_linear(x, w, k, _path="kernel", _splits=splits).clone()
    b = dn.dense_linear(x, w, k, _path="kernel", _splits=splits).clone()
    assert torch.equal(a, b), "the same inputs gave different bits"
    ref, bound = ref_product(kept(x.cpu(), k, "none"), w.weight_t)
    check_close(a, ref, bound, k)


def test_ties_go_to_the_lower_index():
    d, n = 64, 64
    x = torch.zeros(1, d, device=DEV)
    x[0, [3, 10, 20, 30, 40, 50]] = torch.tensor([2.0, -1.0, 1.0, -1.0, 1.0, 1.0], device=DEV)
    eye = torch.eye(d, n).to(torch.bfloat16).to(DEV)  # y = the kept x itself
    w = dn.DenseWeight(eye.contiguous(), (n,))
    y = dn.dense_linear(x, w, 3, _path="kernel").cpu()[0]
    want = torch.zeros(n)
    want[[3, 10, 20]] = torch.tensor([2.0, -1.0, 1.0])  # |x| = 1 at 10, 20, 30, ...: the two lowest indices win
    assert torch.equal(y, want)
    y1 = dn.dense_linear(x, w, 1, _path="kernel").cpu()[0]
    assert y1.nonzero().view(-1).tolist() == [3]


@pytest.mark.parametrize("rescale", ["none", "l2"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.75])
def test_norm_bias_rescale(rescale, s):
    gen = torch.Generator().manual_seed(11 + int(10 * s))
    d, n = 1536, 1792 + 2 * 256  # q | k | v of a GQA model
    x = make_x(d, "randn", gen)
    nw = (1 + 0.2 * torch.randn(d, generator=gen)).to(DEV)
    bias = (0.1 * torch.randn(n, generator=gen)).to(DEV)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (1792, 256, 256), bias, rescale)
    k = max(1, topk_count(d, s))
    out = torch.full((1, n), float("nan"), device=DEV)
    dn.dense_linear(x, w, k, norm_weight=nw, norm_eps=1e-6, out=out, _path="kernel")
    xk = kept(ref_norm(x, nw, 1e-6), k, rescale)
    ref, bound = ref_product(xk, w.weight_t)
    ref = ref + bias.double().cpu()
    # the fused norm, and the L2 factor (two sums of squares, two roots, a division), before every term
    check_close(out, ref, bound, k, rel_terms=norm_rel(d) + ((d + 8) * U if rescale == "l2" else 0.0))


@pytest.mark.parametrize("k_gate,k_up", [(300, 300), (200, 450), (512, 100), (512, 512)])
def test_silu_glu_with_distinct_gate_and_up_k(k_gate, k_up):
    gen = torch.Generator().manual_seed(k_gate + k_up)
    d, m = 512, 1000
    x = make_x(d, "randn", gen)
    nw = (1 + 0.2 * torch.randn(d, generator=gen)).to(DEV)
    w = dn.DenseWeight(make_w(d, 2 * m, gen).to(DEV), (m, m))
    out = torch.full((1, m), float("nan"), device=DEV)
    dn.dense_linear(x, w, (k_gate, k_up), norm_weight=nw, glu="silu", out=out, _path="kernel")
    xn = ref_norm(x, nw, 1e-5)
    g, gb = ref_product(kept(xn, k_gate, "none"), w.weight_t[:, :m])
    u, ub = ref_product(kept(xn, k_up, "none"), w.weight_t[:, m:])
    ref = torch.nn.functional.silu(g) * u
    tg = ((k_gate + 8) * U + norm_rel(d)) * gb + 1e-30
    tu = ((k_up + 8) * U + norm_rel(d)) * ub + 1e-30
    # |d silu| <= 1.1 |dg|; plus the epilogue's expf/div/mul (a few ulps of the result)
    tol = 1.1 * tg * u.abs() + (torch.nn.functional.silu(g).abs() + 1.1 * tg) * tu + 16 * U * ref.abs()
    got = out.double().cpu()
    assert torch.isfinite(got).all()
    assert bool(((got - ref).abs() <= tol).all())


def test_residual_alias_and_bf16_input():
    gen = torch.Generator().manual_seed(5)
    d, n, k = 777, 333, 400
    x = make_x(d, "randn", gen).to(torch.bfloat16)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    h = torch.randn(1, n, generator=gen).to(DEV)
    h0 = h.clone()
    dn.dense_linear(x, w, k, residual=h, out=h, _path="kernel")  # out aliases residual
    ref, bound = ref_product(kept(x.float().cpu(), k, "none"), w.weight_t)
    check_close(h, ref + h0.double().cpu(), bound, k)


@pytest.mark.parametrize("d", [14336, 20001])  # 8B's down projection input (512 threads); 1024 threads above 16384
def test_large_d_uses_the_wide_variant(d):
    gen = torch.Generator().manual_seed(9)
    n = 520  # a narrow output
    x = make_x(d, "randn", gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    for s in (0.0, 0.5):
        k = topk_count(d, s)
        out = torch.full((1, n), float("nan"), device=DEV)
        dn.dense_linear(x, w, k, out=out, _path="kernel")
        ref, bound = ref_product(kept(x.cpu(), k, "none"), w.weight_t)
        check_close(out, ref, bound, k)


def test_kernel_and_torch_paths_agree_to_bf16():
    gen = torch.Generator().manual_seed(3)
    d, n, k = 1024, 2048, 512
    x = make_x(d, "randn", gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    a = dn.dense_linear(x, w, k, _path="kernel")
    b = dn.dense_linear(x, w, k, _path="torch")
    assert float((a - b).norm() / b.norm()) < 1e-2  # the torch path rounds x' to bf16


def test_graph_capture_and_replay():
    gen = torch.Generator().manual_seed(4)
    d, n, k = 896, 1200, 448
    x = make_x(d, "randn", gen)
    w = dn.DenseWeight(make_w(d, n, gen).to(DEV), (n,))
    out = torch.zeros(1, n, device=DEV)
    dn.dense_linear(x, w, k, out=out, _path="kernel")  # sizes the workspace before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dn.dense_linear(x, w, k, out=out, _path="kernel")
    for seed in range(3):
        x.copy_(make_x(d, "randn", torch.Generator().manual_seed(100 + seed)))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = dn.dense_linear(x, w, k, _path="kernel")
        assert torch.equal(out, eager)


def test_bad_arguments_are_named():
    w = dn.DenseWeight(torch.zeros(64, 32, dtype=torch.bfloat16, device=DEV), (32,))
    x = torch.zeros(1, 64, device=DEV)
    with pytest.raises(ValueError, match="k=0 out of range"):
        dn.dense_linear(x, w, 0)
    with pytest.raises(ValueError, match="in_features=64"):
        dn.dense_linear(torch.zeros(1, 63, device=DEV), w, 4)
    with pytest.raises(ValueError, match="needs glu"):
        dn.dense_linear(x, w, (4, 5))
    with pytest.raises(ValueError, match="bf16"):
        dn.DenseWeight(torch.zeros(64, 32, device=DEV), (32,))
