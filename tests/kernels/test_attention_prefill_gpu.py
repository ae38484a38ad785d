"""Causal prefill attention (kernels/decode.attention), variants 1 and 2, against a float64 reference.

Tolerance: fp32 dot products, exp and sums in another order than the float64 reference; relative error
(||out - ref|| / ||ref||) <= 1e-5, as test_decode_kernels_gpu.py states for attention.
Variant 2 must also give a query the same bits whatever call it is in: chunked calls (the serving runner's
chunked prefill), row blocks (its capped workspace) and one whole call agree exactly.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import requires_gpu  # noqa: E402

from qsparse_infer.kernels import decode as dk  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]
DEV = "cuda"
TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, start: int) -> torch.Tensor:
    """q [T, nq, hd]; caches [nkv, L, hd]: float64 causal GQA attention, query i at position start + i
    (keys 0 .. min(start + i, L - 1)). Positions past start + T hold NaN poison, so they are cut off first."""
    t, nq, hd = q.shape
    nkv, max_len = kc.shape[0], min(kc.shape[1], start + t)  # no query sees a key past its own position
    k = kc[:, :max_len].double().repeat_interleave(nq // nkv, 0)
    v = vc[:, :max_len].double().repeat_interleave(nq // nkv, 0)
    sc = torch.einsum("thd,hsd->ths", q.double(), k) / math.sqrt(hd)
    pos = torch.arange(max_len)
    last = (start + torch.arange(t)).clamp(max=max_len - 1)
    sc = sc.masked_fill(pos[None, None, :] > last[:, None, None], float("-inf"))
    return torch.einsum("ths,hsd->thd", sc.softmax(-1), v).reshape(t, nq * hd)


def case(nq: int, nkv: int, hd: int, t: int, start: int, max_len: int, dtype: torch.dtype, seed: int):
    """Random q and a cache written up to start + t; positions past that are NaN (never read)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    kc = torch.full((nkv, max_len, hd), float("nan"), device=DEV).to(dtype)
    vc = torch.full((nkv, max_len, hd), float("nan"), device=DEV).to(dtype)
    n = min(start + t, max_len)
    kc[:, :n] = torch.randn(nkv, n, hd, generator=g, device=DEV).to(dtype)
    vc[:, :n] = torch.randn(nkv, n, hd, generator=g, device=DEV).to(dtype)
    qkv = torch.randn(t, (nq + 2 * nkv) * hd + 3, generator=g, device=DEV) * 2  # + 3: a row stride past the q|k|v
    st = torch.tensor([start], dtype=torch.int32, device=DEV)
    return qkv, kc, vc, st


def poisoned(t: int, nq: int, hd: int) -> torch.Tensor:
    return torch.full((t, nq * hd), float("nan"), device=DEV)


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nkv,hd,t,start,max_len", [
    (20, 5, 128, 77, 0, 100),       # 2B4T heads, one split
    (20, 5, 128, 64, 1490, 2100),   # 2B4T heads deep in the cache: 3 splits, a tile across a split boundary
    (12, 4, 96, 13, 5, 40),         # G = 3: a 63-row tile
    (8, 8, 64, 70, 450, 700),       # G = 1 (MHA): 64 tokens per tile, queries on both sides of 512
    (16, 2, 40, 9, 1023, 1040),     # G = 8, hd = 40 (not a multiple of 16), starts at a split's last key
    (6, 3, 17, 5, 0, 5),            # odd hd, the cache exactly full
    (4, 1, 32, 33, 600, 620),       # G = 4 with one kv head, max_len not a multiple of 32
])
def test_prefill_attention_matches_reference(variant, dtype, nq, nkv, hd, t, start, max_len):
    qkv, kc, vc, st = case(nq, nkv, hd, t, start, max_len, dtype, seed=nq * 1000 + t)
    out = dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=poisoned(t, nq, hd), variant=variant)
    ref = reference(qkv[:, :nq * hd].view(t, nq, hd).cpu(), kc.cpu(), vc.cpu(), start)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL


def test_prefill_attention_positions_past_the_cache_are_clamped():
    """Queries at positions >= max_len see keys 0 .. max_len - 1 (as variant 1 always did)."""
    nq, nkv, hd, t, start, max_len = 8, 2, 64, 6, 520, 523
    qkv, kc, vc, st = case(nq, nkv, hd, t, start, max_len, torch.float32, seed=3)
    v1 = dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=poisoned(t, nq, hd), variant=1)
    v2 = dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=poisoned(t, nq, hd), variant=2)
    ref = reference(qkv[:, :nq * hd].view(t, nq, hd).cpu(), kc.cpu(), vc.cpu(), start)
    assert rel_err(v1, ref) < TOL and rel_err(v2, ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nkv,hd", [(20, 5, 128), (12, 4, 96), (8, 8, 64)])
def test_tiled_prefill_is_chunk_invariant(dtype, nq, nkv, hd):
    """One call over a 1400-token prompt equals chunked calls (uneven chunks, as the runner's chunked prefill
    makes them) bit for bit: a query's bits depend only on its position."""
    t, max_len = 1400, 1500
    qkv, kc, vc, _ = case(nq, nkv, hd, t, 0, max_len, dtype, seed=11)
    zero = torch.zeros(1, dtype=torch.int32, device=DEV)
    whole = dk.attention(qkv, nq, nkv, hd, kc, vc, zero, out=poisoned(t, nq, hd))
    chunked = poisoned(t, nq, hd)
    cuts = [0, 1, 64, 100, 511, 512, 513, 700, 1024, 1399, 1400]
    for a, b in zip(cuts, cuts[1:]):
        st = torch.tensor([a], dtype=torch.int32, device=DEV)
        dk.attention(qkv[a:b].contiguous(), nq, nkv, hd, kc, vc, st, out=chunked[a:b])
    assert torch.equal(whole, chunked)


def test_tiled_prefill_row_blocks_give_the_same_bits(monkeypatch):
    """A workspace cap that forces several launches (t_base > 0) changes no bit."""
    nq, nkv, hd, t, start, max_len = 20, 5, 128, 300, 900, 1300
    qkv, kc, vc, st = case(nq, nkv, hd, t, start, max_len, torch.bfloat16, seed=12)
    one = dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=poisoned(t, nq, hd))
    per_row = dk.ext().attention_tiled_workspace_floats(1, nq, hd, max_len)
    monkeypatch.setattr(dk, "PREFILL_WORKSPACE_FLOATS", 37 * per_row)  # blocks of 37 rows
    blocks = dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=poisoned(t, nq, hd))
    assert torch.equal(one, blocks)


def test_prefill_attention_rejects_bad_arguments():
    qkv, kc, vc, st = case(8, 2, 64, 4, 0, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="variant"):
        dk.attention(qkv, 8, 2, 64, kc, vc, st, variant=3)
    with pytest.raises(ValueError, match="cache must be"):
        dk.attention(qkv, 8, 2, 64, kc[:1], vc[:1], st)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dk.attention(qkv, 9, 2, 64, kc, vc, st)



def chunks_case(nq: int, nkv: int, hd: int, chunks: list[tuple[int, int, int]], max_len: int, dtype: torch.dtype,
                seed: int, lead_rows: int = 3):
    """Pools of 5 slots; chunk (slot, start, tokens) gets a cache filled to start + tokens (NaN past it) and
    rows after `lead_rows` rows that no chunk owns (a mixed step's decode rows)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    slots = 5
    kp = torch.full((slots, nkv, max_len, hd), float("nan"), device=DEV).to(dtype)
    vp = torch.full((slots, nkv, max_len, hd), float("nan"), device=DEV).to(dtype)
    pos = torch.zeros(slots, dtype=torch.int32, device=DEV)
    rows, plan_in, r = [], [], lead_rows
    for slot, start, n in chunks:
        m = min(start + n, max_len)
        kp[slot, :, :m] = torch.randn(nkv, m, hd, generator=g, device=DEV).to(dtype)
        vp[slot, :, :m] = torch.randn(nkv, m, hd, generator=g, device=DEV).to(dtype)
        pos[slot] = start
        plan_in.append((r, n, slot))
        r += n
    qkv = torch.randn(r, (nq + 2 * nkv) * hd + 3, generator=g, device=DEV) * 2
    return qkv, kp, vp, pos, plan_in


CHUNKS = [(3, 0, 128), (0, 700, 37), (4, 1020, 1), (1, 5, 600), (2, 511, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nkv,hd", [(20, 5, 128), (12, 4, 96), (9, 3, 40)])
def test_chunks_in_one_launch_equal_calls_per_chunk(dtype, nq, nkv, hd):
    """Several prompts' chunks in one launch (the serving runner's mixed step) give every query the bits of
    `attention` on its chunk alone: chunks of 1 to 600 tokens, starts on and off the 512-key split edges,
    partial query tiles. Rows that no chunk owns keep their poison, and so do the pools past each chunk."""
    max_len = 1100
    qkv, kp, vp, pos, plan_in = chunks_case(nq, nkv, hd, CHUNKS, max_len, dtype, seed=21)
    plan = dk.plan_chunks(plan_in, nq, nkv, hd, max_len, torch.device(DEV))
    got = dk.attention_chunks(qkv, kp, vp, pos, plan, out=poisoned(qkv.shape[0], nq, hd))
    want = poisoned(qkv.shape[0], nq, hd)
    for row0, n, slot in plan_in:
        dk.attention(qkv[row0:row0 + n].contiguous(), nq, nkv, hd, kp[slot], vp[slot], pos[slot:slot + 1],
                     out=want[row0:row0 + n])
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert got[:3].isnan().all()  # the lead rows are nobody's
    for row0, n, slot in plan_in[:2]:  # and against float64 on two of them
        ref = reference(qkv[row0:row0 + n, :nq * hd].reshape(n, nq, hd).cpu(), kp[slot].cpu(), vp[slot].cpu(),
                        int(pos[slot]))
        assert rel_err(got[row0:row0 + n], ref) <= TOL


def test_chunks_workspace_blocks_give_the_same_bits(monkeypatch):
    """A workspace cap that splits the tiles over several launches changes no bit."""
    nq, nkv, hd, max_len = 20, 5, 128, 1300
    qkv, kp, vp, pos, plan_in = chunks_case(nq, nkv, hd, CHUNKS, max_len, torch.bfloat16, seed=22)
    one_plan = dk.plan_chunks(plan_in, nq, nkv, hd, max_len, torch.device(DEV))
    one = dk.attention_chunks(qkv, kp, vp, pos, one_plan, out=poisoned(qkv.shape[0], nq, hd))
    per_row = dk.ext().attention_tiled_workspace_floats(1, nq, hd, max_len)
    monkeypatch.setattr(dk, "PREFILL_WORKSPACE_FLOATS", 50 * per_row)
    plan = dk.plan_chunks(plan_in, nq, nkv, hd, max_len, torch.device(DEV))
    assert len(plan.launches) > 5
    blocks = dk.attention_chunks(qkv, kp, vp, pos, plan, out=poisoned(qkv.shape[0], nq, hd))
    assert torch.equal(one.nan_to_num(), blocks.nan_to_num()) and torch.equal(one.isnan(), blocks.isnan())


def test_chunks_reject_bad_arguments():
    nq, nkv, hd, max_len = 8, 2, 64, 64
    qkv, kp, vp, pos, plan_in = chunks_case(nq, nkv, hd, [(0, 0, 10), (1, 3, 5)], max_len, torch.float32, seed=2)
    dev = torch.device(DEV)
    with pytest.raises(ValueError, match="one chunk per slot"):
        dk.plan_chunks([(0, 4, 1), (4, 4, 1)], nq, nkv, hd, max_len, dev)
    with pytest.raises(ValueError, match="ascending"):
        dk.plan_chunks([(0, 4, 1), (2, 4, 0)], nq, nkv, hd, max_len, dev)
    plan = dk.plan_chunks(plan_in, nq, nkv, hd, max_len, dev)
    with pytest.raises(ValueError, match="pools must be"):
        dk.attention_chunks(qkv, kp[:, :1].contiguous(), vp[:, :1].contiguous(), pos, plan,
                            out=poisoned(qkv.shape[0], nq, hd))
    with pytest.raises(ValueError, match="reach row"):
        dk.attention_chunks(qkv[:10], kp, vp, pos, plan, out=poisoned(10, nq, hd))
    with pytest.raises(ValueError, match="position per slot"):
        dk.attention_chunks(qkv, kp, vp, pos[:2], plan, out=poisoned(qkv.shape[0], nq, hd))
