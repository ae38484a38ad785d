"""Batched decode attention (attention_decode) and batched RoPE + KV append (rope_append_batch) on the GPU.

Tolerance: attention is fp32 dot products, exp and sums in another order than the float64 reference
(tiles, lanes, splits merged in a fixed order), with the cache values themselves as inputs (no bf16 rounding
in the reference beyond what is stored), so relative error ||out - ref|| / ||ref|| <= 1e-5 per row.
RoPE is the same fp32 products and sum as the reference: bit-exact.
Batch invariance is exact (torch.equal): a row's split plan depends only on its own length.
Cache positions a row must not read are NaN, so any stray read shows up as a NaN output.
"""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import requires_gpu  # noqa: E402

from qsparse_infer.kernels import decode as dk  # noqa: E402
from qsparse_infer.model.reference import apply_rope, rope_cos_sin  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]
DEV = "cuda"
TOL = 1e-5
NAN = float("nan")


def _caches(num_slots, nkv, max_len, hd, dtype, gen):
    """NaN-filled caches; _fill writes the positions a row may read."""
    kc = torch.full((num_slots, nkv, max_len, hd), NAN, device=DEV, dtype=dtype)
    return kc, torch.full_like(kc, NAN)


def _fill(kc, vc, slot, length, gen):
    nkv, _, hd = kc.shape[1:]
    kc[slot, :, :length] = torch.randn(nkv, length, hd, generator=gen, device=DEV).to(kc.dtype)
    vc[slot, :, :length] = torch.randn(nkv, length, hd, generator=gen, device=DEV).to(vc.dtype)


def _ref_row(q, kc, vc, slot, length):
    """q [nq, hd]; float64 attention of the row over positions [0, length) of the slot -> [nq * hd]."""
    nq, hd = q.shape
    nkv = kc.shape[1]
    k = kc[slot, :, :length].double().cpu().repeat_interleave(nq // nkv, 0)
    v = vc[slot, :, :length].double().cpu().repeat_interleave(nq // nkv, 0)
    sc = torch.einsum("hd,hsd->hs", q.double().cpu(), k) / math.sqrt(hd)
    return torch.einsum("hs,hsd->hd", sc.softmax(-1), v).reshape(-1)


def _rel(out_row, ref_row):
    out_row = out_row.double().cpu()
    assert torch.isfinite(out_row).all(), "non-finite output (unwritten, or a NaN cache position was read)"
    return float((out_row - ref_row).norm() / ref_row.norm().clamp(min=1e-30))


def _run_and_check(nq, nkv, hd, dtype, lengths, slots, num_slots, max_len, ws, gen, reps=1):
    b = len(lengths)
    kc, vc = _caches(num_slots, nkv, max_len, hd, dtype, gen)
    for s, n in zip(slots, lengths):
        _fill(kc, vc, s, n, gen)
    pos = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device=DEV)
    sl = torch.tensor(slots, dtype=torch.int32, device=DEV)
    for _ in range(reps):  # same workspace every time: the counters must reset themselves
        qkv = torch.randn(b, (nq + 2 * nkv) * hd + 3, generator=gen, device=DEV) * 2  # stride != width
        out = torch.full((b, nq * hd), NAN, device=DEV)
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, out, ws)
        for i in range(b):
            ref = _ref_row(qkv[i, :nq * hd].view(nq, hd), kc, vc, slots[i], lengths[i])
            err = _rel(out[i], ref)
            assert err <= TOL, (i, lengths[i], err)
    assert int(ws.counters.abs().sum()) == 0
    return kc, vc


CHUNK = dk.DEFAULT_MIN_CHUNK
EDGE_LENGTHS = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 5000]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,nkv,hd", [(20, 5, 128), (32, 8, 128), (8, 1, 96), (6, 6, 40), (6, 3, 34),
                                       (21, 7, 64), (40, 5, 64), (14, 2, 34), (5, 1, 128)])
def test_attention_decode_matches_reference(dtype, nq, nkv, hd):
    gen = torch.Generator(device=DEV).manual_seed(11)
    max_len, num_slots = 5003, 11
    ws = dk.AttentionWorkspace.create(len(EDGE_LENGTHS), nq, nkv, hd, max_len, DEV)
    slots = [9, 0, 4, 2, 7, 10, 5]  # permuted, non-contiguous
    _run_and_check(nq, nkv, hd, dtype, EDGE_LENGTHS, slots, num_slots, max_len, ws, gen, reps=2)


@pytest.mark.parametrize("min_chunk,max_splits", [(16, 3), (1, 128), (5000, 1), (7, 1)])
def test_attention_decode_split_plans(min_chunk, max_splits):
    """Few splits with long chunks (multi-tile online softmax), the 128-split limit, and no split at all."""
    gen = torch.Generator(device=DEV).manual_seed(12)
    nq, nkv, hd, max_len = 20, 5, 128, 4100
    lengths = [1, 3, 15, 16, 17, 48, 200, 1000, 4099]
    slots = list(range(len(lengths)))[::-1]
    ws = dk.AttentionWorkspace.create(len(lengths), nq, nkv, hd, max_len, DEV, min_chunk=min_chunk,
                                      max_splits=max_splits)
    for dtype in (torch.bfloat16, torch.float32):
        _run_and_check(nq, nkv, hd, dtype, lengths, slots, len(lengths), max_len, ws, gen)


def test_attention_decode_single_sequence_cache():
    """A 3-D cache [nkv, max_len, hd] is one slot."""
    gen = torch.Generator(device=DEV).manual_seed(13)
    nq, nkv, hd, max_len, n = 8, 2, 64, 300, 257
    kc, vc = _caches(1, nkv, max_len, hd, torch.bfloat16, gen)
    _fill(kc, vc, 0, n, gen)
    ws = dk.AttentionWorkspace.create(1, nq, nkv, hd, max_len, DEV)
    qkv = torch.randn(1, (nq + 2 * nkv) * hd, generator=gen, device=DEV)
    pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
    out = torch.full((1, nq * hd), NAN, device=DEV)
    dk.attention_decode(qkv, nq, nkv, hd, kc[0], vc[0], pos, torch.zeros(1, dtype=torch.int32, device=DEV), out, ws)
    assert _rel(out[0], _ref_row(qkv[0, :nq * hd].view(nq, hd), kc, vc, 0, n)) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,nkv,hd", [(20, 5, 128), (12, 3, 34)])
def test_attention_decode_batch_invariance(dtype, nq, nkv, hd):
    """Every row of a B = 33 batch equals (bit for bit) the same sequence run alone at B = 1, and any
    B in between gives the same rows too."""
    gen = torch.Generator(device=DEV).manual_seed(14)
    rnd = random.Random(14)
    max_len, num_slots, b = 3000, 40, 33
    lengths = EDGE_LENGTHS[:-1] + [max_len] + [rnd.randint(1, max_len) for _ in range(b - len(EDGE_LENGTHS))]
    slots = rnd.sample(range(num_slots), b)
    ws = dk.AttentionWorkspace.create(b, nq, nkv, hd, max_len, DEV)
    kc, vc = _run_and_check(nq, nkv, hd, dtype, lengths, slots, num_slots, max_len, ws, gen)
    qkv = torch.randn(b, (nq + 2 * nkv) * hd, generator=gen, device=DEV)
    pos = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device=DEV)
    sl = torch.tensor(slots, dtype=torch.int32, device=DEV)
    full = dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, None, ws)
    ws1 = dk.AttentionWorkspace.create(1, nq, nkv, hd, max_len + 500, DEV)  # other max_len: same plan
    for i in range(b):
        one = torch.full((1, nq * hd), NAN, device=DEV)
        dk.attention_decode(qkv[i:i + 1].clone(), nq, nkv, hd, kc, vc, pos[i:i + 1].clone(), sl[i:i + 1].clone(),
                            one, ws1)
        assert torch.equal(one[0], full[i]), i
    for sub in (2, 5, 17):
        part = dk.attention_decode(qkv[-sub:].contiguous(), nq, nkv, hd, kc, vc, pos[-sub:].contiguous(),
                                   sl[-sub:].contiguous(), None, ws)
        assert torch.equal(part, full[-sub:])
    assert int(ws.counters.abs().sum()) == 0 and int(ws1.counters.abs().sum()) == 0


def test_attention_decode_graph_replay_new_lengths():
    """Captured once, replayed with other lengths and slots written into the same device buffers."""
    gen = torch.Generator(device=DEV).manual_seed(15)
    nq, nkv, hd, max_len, num_slots, b = 20, 5, 128, 2048, 6, 3
    kc, vc = _caches(num_slots, nkv, max_len, hd, torch.bfloat16, gen)
    for s in range(num_slots):
        _fill(kc, vc, s, max_len, gen)
    ws = dk.AttentionWorkspace.create(b, nq, nkv, hd, max_len, DEV)
    qkv = torch.randn(b, (nq + 2 * nkv) * hd, generator=gen, device=DEV)
    pos = torch.zeros(b, dtype=torch.int32, device=DEV)
    sl = torch.arange(b, dtype=torch.int32, device=DEV)
    out = torch.full((b, nq * hd), NAN, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, out, ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, out, ws)
    for lengths, slots in (([1, 700, 2048], [5, 0, 3]), ([64, 65, 1], [1, 2, 4]), ([2048, 2047, 129], [2, 2, 2])):
        pos.copy_(torch.tensor([n - 1 for n in lengths], dtype=torch.int32))
        sl.copy_(torch.tensor(slots, dtype=torch.int32))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        for i in range(b):
            ref = _ref_row(qkv[i, :nq * hd].view(nq, hd), kc, vc, slots[i], lengths[i])
            assert _rel(out[i], ref) <= TOL, (lengths, i)
    assert int(ws.counters.abs().sum()) == 0


def test_attention_decode_bad_device_rows_are_nan():
    """A slot out of range or a negative position (device values) gives a NaN row; the others are right."""
    gen = torch.Generator(device=DEV).manual_seed(16)
    nq, nkv, hd, max_len = 8, 2, 64, 500
    kc, vc = _caches(2, nkv, max_len, hd, torch.float32, gen)
    _fill(kc, vc, 1, 300, gen)
    ws = dk.AttentionWorkspace.create(4, nq, nkv, hd, max_len, DEV)
    qkv = torch.randn(4, (nq + 2 * nkv) * hd, generator=gen, device=DEV)
    pos = torch.tensor([299, 10, -1, 299], dtype=torch.int32, device=DEV)
    sl = torch.tensor([1, 2, 1, -3], dtype=torch.int32, device=DEV)
    out = dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, None, ws)
    assert _rel(out[0], _ref_row(qkv[0, :nq * hd].view(nq, hd), kc, vc, 1, 300)) <= TOL
    assert torch.isnan(out[1:]).all()
    assert int(ws.counters.abs().sum()) == 0


def test_attention_decode_rejects_bad_arguments():
    nq, nkv, hd, max_len = 8, 2, 64, 100
    kc = torch.zeros(3, nkv, max_len, hd, device=DEV)
    vc = torch.zeros_like(kc)
    ws = dk.AttentionWorkspace.create(2, nq, nkv, hd, max_len, DEV)
    qkv = torch.zeros(2, (nq + 2 * nkv) * hd, device=DEV)
    pos = torch.zeros(2, dtype=torch.int32, device=DEV)
    sl = torch.zeros(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="max_batch"):
        dk.attention_decode(torch.zeros(3, qkv.shape[1], device=DEV), nq, nkv, hd, kc, vc,
                            torch.zeros(3, dtype=torch.int32, device=DEV), torch.zeros(3, dtype=torch.int32,
                                                                                      device=DEV), None, ws)
    with pytest.raises(ValueError, match="one entry per qkv row"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos[:1], sl, None, ws)
    with pytest.raises(ValueError, match="workspace is for"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos, sl, None,
                            dk.AttentionWorkspace.create(2, 4, nkv, hd, max_len, DEV))
    with pytest.raises(ValueError, match="same shape"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc[:2], pos, sl, None, ws)
    with pytest.raises(ValueError, match="int32"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, vc, pos.long(), sl, None, ws)
    with pytest.raises(ValueError, match="nq/nkv <= 8"):
        dk.attention_decode(qkv, 18, 2, hd, kc, vc, pos, sl, None, ws)
    with pytest.raises(ValueError, match="max_splits"):
        dk.AttentionWorkspace.create(1, nq, nkv, hd, max_len, DEV, max_splits=129)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_append_batch_bit_exact(cache_dtype):
    nq, nkv, hd, max_len, num_slots = 6, 2, 48, 37, 7
    gen = torch.Generator(device=DEV).manual_seed(17)
    positions, slots = [0, 36, 5, 5, 17], [3, 0, 6, 1, 4]
    b = len(positions)
    qkv = torch.randn(b, (nq + 2 * nkv) * hd + 8, generator=gen, device=DEV)
    orig = qkv.clone()
    kc, vc = _caches(num_slots, nkv, max_len, hd, cache_dtype, gen)
    cos, sin = rope_cos_sin(torch.arange(max_len), hd, 10000.0)
    cos_t, sin_t = cos[:, :hd // 2].contiguous().to(DEV), sin[:, :hd // 2].contiguous().to(DEV)
    dk.rope_append_batch(qkv, nq, nkv, hd, cos_t, sin_t, torch.tensor(positions, dtype=torch.int32, device=DEV),
                         kc, vc, torch.tensor(slots, dtype=torch.int32, device=DEV))
    c, s = rope_cos_sin(torch.tensor(positions), hd, 10000.0)
    o = orig.cpu()
    q_ref = apply_rope(o[:, :nq * hd].view(b, nq, hd), c, s).reshape(b, -1)
    k_ref = apply_rope(o[:, nq * hd:(nq + nkv) * hd].view(b, nkv, hd), c, s)
    v_ref = o[:, (nq + nkv) * hd:(nq + 2 * nkv) * hd].view(b, nkv, hd)
    assert torch.equal(qkv[:, :nq * hd].cpu(), q_ref)
    assert torch.equal(qkv[:, nq * hd:].cpu(), o[:, nq * hd:])  # k/v columns of qkv untouched
    kcc, vcc = kc.cpu(), vc.cpu()
    written = torch.zeros(num_slots, max_len, dtype=torch.bool)
    for i, (p, sl) in enumerate(zip(positions, slots)):
        assert torch.equal(kcc[sl, :, p], k_ref[i].to(cache_dtype))
        assert torch.equal(vcc[sl, :, p], v_ref[i].to(cache_dtype))
        written[sl, p] = True
    assert torch.isnan(kcc.transpose(1, 2)[~written].float()).all()
    assert torch.isnan(vcc.transpose(1, 2)[~written].float()).all()
    # and bit-identical with the single-sequence rope_append at the same position
    one = orig[2:3].clone()
    kc1 = torch.full((nkv, max_len, hd), NAN, device=DEV, dtype=cache_dtype)
    vc1 = torch.full_like(kc1, NAN)
    dk.rope_append(one, nq, nkv, hd, cos_t, sin_t, torch.tensor([5], dtype=torch.int32, device=DEV), kc1, vc1)
    assert torch.equal(one[0, :nq * hd], qkv[2, :nq * hd])
    assert torch.equal(kc1[:, 5], kc[6, :, 5]) and torch.equal(vc1[:, 5], vc[6, :, 5])


def test_rope_append_batch_skips_out_of_range_rows():
    nq, nkv, hd, max_len = 4, 2, 16, 10
    kc, vc = _caches(2, nkv, max_len, hd, torch.float32, None)
    cos, sin = rope_cos_sin(torch.arange(max_len), hd, 10000.0)
    cos_t, sin_t = cos[:, :hd // 2].contiguous().to(DEV), sin[:, :hd // 2].contiguous().to(DEV)
    qkv = torch.randn(3, (nq + 2 * nkv) * hd, device=DEV)
    orig = qkv.clone()
    dk.rope_append_batch(qkv, nq, nkv, hd, cos_t, sin_t, torch.tensor([10, -1, 3], dtype=torch.int32, device=DEV),
                         kc, vc, torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV))
    assert torch.isnan(kc).all() and torch.isnan(vc).all()
    assert torch.equal(qkv, orig)


def _bits(t):
    """Exact bit pattern (NaN-safe comparisons of caches and outputs)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,nkv,hd", [(20, 5, 128), (12, 3, 34), (8, 1, 96), (6, 6, 40), (40, 5, 64)])
@pytest.mark.parametrize("min_chunk,max_splits", [(dk.DEFAULT_MIN_CHUNK, None), (dk.BATCHED_MIN_CHUNK, None),
                                                  (5000, 1)])
def test_attention_decode_fused_rope_bit_identical(dtype, nq, nkv, hd, min_chunk, max_splits):
    """rope=(cos, sin): the same output and the same caches, bit for bit, as rope_append_batch followed by the
    unfused call; qkv is left raw. Rows: the first position, chunk edges, a long row (with one split the new
    token sits in a later tile than the first), a position past the cache (neither rotated nor stored), and
    a bad slot (NaN)."""
    gen = torch.Generator(device=DEV).manual_seed(18)
    max_len, num_slots = 700, 9
    positions = [0, min(min_chunk, 600) - 1, min(min_chunk, 600), 2 * 32, 699, 650, max_len + 3, 40]
    slots = [8, 0, 3, 5, 1, 7, 2, -1]
    b = len(positions)
    kc, vc = _caches(num_slots, nkv, max_len, hd, dtype, gen)
    for s in range(num_slots):
        _fill(kc, vc, s, max_len, gen)
    cos, sin = rope_cos_sin(torch.arange(max_len), hd, 10000.0)
    cos_t, sin_t = cos[:, :hd // 2].contiguous().to(DEV), sin[:, :hd // 2].contiguous().to(DEV)
    qkv = torch.randn(b, (nq + 2 * nkv) * hd + 5, generator=gen, device=DEV)
    pos = torch.tensor(positions, dtype=torch.int32, device=DEV)
    sl = torch.tensor(slots, dtype=torch.int32, device=DEV)
    kw = dict(min_chunk=min_chunk, max_splits=max_splits)
    ws_a = dk.AttentionWorkspace.create(b, nq, nkv, hd, max_len, DEV, **kw)
    ws_b = dk.AttentionWorkspace.create(b, nq, nkv, hd, max_len, DEV, **kw)
    qa, ka, va = qkv.clone(), kc.clone(), vc.clone()
    dk.rope_append_batch(qa, nq, nkv, hd, cos_t, sin_t, pos, ka, va, sl)
    out_a = dk.attention_decode(qa, nq, nkv, hd, ka, va, pos, sl, None, ws_a)
    qb, kb, vb = qkv.clone(), kc.clone(), vc.clone()
    out_b = dk.attention_decode(qb, nq, nkv, hd, kb, vb, pos, sl, None, ws_b, rope=(cos_t, sin_t))
    assert torch.equal(qb, qkv), "the fused call must leave qkv raw"
    assert torch.equal(_bits(out_a), _bits(out_b))
    assert torch.equal(_bits(ka), _bits(kb)) and torch.equal(_bits(va), _bits(vb))
    assert torch.isnan(out_b[-1]).all() and torch.isfinite(out_b[:-1]).all()
    assert not torch.equal(_bits(kb), _bits(kc)), "the new tokens were stored"
    assert int(ws_b.counters.abs().sum()) == 0


def test_attention_decode_fused_rope_rejects_bad_tables():
    nq, nkv, hd, max_len = 8, 2, 64, 100
    kc = torch.zeros(1, nkv, max_len, hd, device=DEV)
    qkv = torch.zeros(1, (nq + 2 * nkv) * hd, device=DEV)
    pos = torch.zeros(1, dtype=torch.int32, device=DEV)
    ws = dk.AttentionWorkspace.create(1, nq, nkv, hd, max_len, DEV)
    good = torch.zeros(max_len, hd // 2, device=DEV)
    with pytest.raises(ValueError, match="cos_t"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, kc.clone(), pos, pos, None, ws, rope=(good[:50], good))
    with pytest.raises(ValueError, match="sin_t"):
        dk.attention_decode(qkv, nq, nkv, hd, kc, kc.clone(), pos, pos, None, ws, rope=(good, good.double()))
