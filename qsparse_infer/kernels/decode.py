"""Python wrappers of the decoder kernels (csrc/decode_*.cu): validate tensors, then pass raw pointers and
the current CUDA stream to _C. They allocate nothing unless `out` is omitted, and never synchronize, so a
sequence of calls can be captured in a CUDA graph (the kernels read positions from device buffers)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._ext import current_stream_handle, ext

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _stream() -> int:
    return current_stream_handle()


def _check(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def embedding(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table [V, H] (fp32/bf16/fp16), ids [T] int32 on the GPU -> fp32 [T, H]. Ids are not range-checked
    here (that would sync); out-of-range ids produce NaN rows."""
    _check(table, "table", tuple(DTYPE_CODE), 2)
    _check(ids, "ids", (torch.int32,), 1)
    v, h = table.shape
    t = ids.shape[0]
    if out is None:
        out = torch.empty((t, h), dtype=torch.float32, device=table.device)
    _check(out, "out", (torch.float32,), 2)
    if tuple(out.shape) != (t, h):
        raise ValueError(f"out must be [{t}, {h}], got {tuple(out.shape)}")
    ext().embedding_gather(table.data_ptr(), DTYPE_CODE[table.dtype], ids.data_ptr(), t, h, v, out.data_ptr(),
                           _stream())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 RMSNorm of each row of x [T, H] times weight [H] (fp32)."""
    _check(x, "x", (torch.float32,), 2)
    _check(weight, "weight", (torch.float32,), 1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} elements, x rows have {x.shape[1]}")
    if out is None:
        out = torch.empty_like(x)
    _check(out, "out", (torch.float32,), 2)
    if out.shape != x.shape:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    ext().rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], float(eps), _stream())
    return out


def _check_cache(kc: torch.Tensor, vc: torch.Tensor, nkv: int, hd: int) -> int:
    _check(kc, "k_cache", (torch.float32, torch.bfloat16), 3)
    _check(vc, "v_cache", (torch.float32, torch.bfloat16), 3)
    if kc.shape != vc.shape or kc.dtype != vc.dtype:
        raise ValueError("k_cache and v_cache must have the same shape and dtype")
    if kc.shape[0] != nkv or kc.shape[2] != hd:
        raise ValueError(f"cache must be [{nkv}, max_len, {hd}], got {tuple(kc.shape)}")
    return kc.shape[1]


def rope_append(qkv: torch.Tensor, nq: int, nkv: int, hd: int, cos_t: torch.Tensor, sin_t: torch.Tensor,
                start: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """qkv [T, >= (nq + 2 nkv) hd] fp32: rotate q in place; write rotated k and v to the caches
    [nkv, max_len, hd] at positions start[0] + t. cos_t/sin_t [max_len, hd/2] fp32; start int32 [1]."""
    _check(qkv, "qkv", (torch.float32,), 2)
    if qkv.shape[1] < (nq + 2 * nkv) * hd:
        raise ValueError(f"qkv rows have {qkv.shape[1]} values, need {(nq + 2 * nkv) * hd}")
    max_len = _check_cache(k_cache, v_cache, nkv, hd)
    for name, tab in (("cos_t", cos_t), ("sin_t", sin_t)):
        _check(tab, name, (torch.float32,), 2)
        if tab.shape[0] < max_len or tab.shape[1] != hd // 2:
            raise ValueError(f"{name} must be [>= {max_len}, {hd // 2}], got {tuple(tab.shape)}")
    _check(start, "start", (torch.int32,), 1)
    ext().rope_append(qkv.data_ptr(), qkv.shape[1], qkv.shape[0], nq, nkv, hd, cos_t.data_ptr(), sin_t.data_ptr(),
                      start.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), DTYPE_CODE[k_cache.dtype], max_len,
                      _stream())


# Variant 2's fp32 partials per call are capped here (~64 MB); longer calls run in blocks of rows, which
# gives the same bits (a query's result depends only on its position).
PREFILL_WORKSPACE_FLOATS = 16 * 2**20
_prefill_ws: dict[int, torch.Tensor] = {}


def _prefill_workspace(device: torch.device, floats: int) -> torch.Tensor:
    key = device.index if device.index is not None else torch.cuda.current_device()
    ws = _prefill_ws.get(key)
    if ws is None or ws.numel() < floats:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"attention: the prefill workspace must grow to {floats} floats during CUDA graph "
                               "capture; run the call once with these shapes before capturing")
        ws = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        _prefill_ws[key] = ws
    return ws


def attention(qkv: torch.Tensor, nq: int, nkv: int, hd: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
              start: torch.Tensor, out: torch.Tensor | None = None, variant: int = 2) -> torch.Tensor:
    """Causal attention of the T query rows of qkv (rotated q first) over the cache, query t at position
    start[0] + t (the prefill path; one-token decode uses attention_decode). Returns fp32 [T, nq*hd].

    variant 2 (default, csrc/decode/attention_tiled.cu): 64-row query tiles x 512-key splits; a query's bits
    depend only on its position and the cache, so chunked prefill equals one call. variant 1
    (csrc/decode/attention.cu): one block per (kv head, query), the reference and the lab's baseline."""
    _check(qkv, "qkv", (torch.float32,), 2)
    max_len = _check_cache(k_cache, v_cache, nkv, hd)
    _check(start, "start", (torch.int32,), 1)
    if variant not in (1, 2):
        raise ValueError(f"attention variant must be 1 or 2, got {variant!r}")
    t = qkv.shape[0]
    if out is None:
        out = torch.empty((t, nq * hd), dtype=torch.float32, device=qkv.device)
    _check(out, "out", (torch.float32,), 2)
    if tuple(out.shape) != (t, nq * hd):
        raise ValueError(f"out must be [{t}, {nq * hd}], got {tuple(out.shape)}")
    if variant == 1:
        ext().attention(qkv.data_ptr(), qkv.shape[1], t, nq, nkv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                        DTYPE_CODE[k_cache.dtype], max_len, start.data_ptr(), out.data_ptr(), _stream())
        return out
    if t == 0:
        return out
    per_row = ext().attention_tiled_workspace_floats(1, nq, hd, max_len)
    rows = t if per_row == 0 else max(1, min(t, PREFILL_WORKSPACE_FLOATS // per_row))
    ws = _prefill_workspace(qkv.device, rows * per_row) if per_row else None
    stride, row_q, row_o = qkv.shape[1], qkv.shape[1] * 4, nq * hd * 4
    for r0 in range(0, t, rows):
        n = min(rows, t - r0)
        ext().attention_tiled(qkv.data_ptr() + r0 * row_q, stride, n, r0, nq, nkv, hd, k_cache.data_ptr(),
                              v_cache.data_ptr(), DTYPE_CODE[k_cache.dtype], max_len, start.data_ptr(),
                              out.data_ptr() + r0 * row_o, ws.data_ptr() if ws is not None else 0,
                              n * per_row, _stream())
    return out


@dataclass(frozen=True)
class PrefillChunks:
    """Where the prompt chunks of one serving step sit, as attention_chunks's tiles: built once per step on the
    host (one copy to the device) and shared by every layer. `launches` are (first tile, end tile, first row,
    rows): consecutive tiles whose rows' fp32 partials fit PREFILL_WORKSPACE_FLOATS together."""

    tiles: torch.Tensor  # int32 [ntiles, 4] on the device: first row, tokens, slot, offset in the chunk
    launches: tuple[tuple[int, int, int, int], ...]
    nq: int
    nkv: int
    hd: int
    max_len: int


def plan_chunks(chunks: list[tuple[int, int, int]], nq: int, nkv: int, hd: int, max_len: int,
                device: torch.device) -> PrefillChunks:
    """chunks: (first row in qkv, tokens, cache slot) per prompt chunk, rows ascending and disjoint, one chunk per
    slot. Each chunk is cut into variant 2's query tiles (64 / G tokens) exactly as a call of `attention` on it
    alone would cut it, so every query keeps its bits."""
    if nkv <= 0 or nq % nkv or nq // nkv > 8:
        raise ValueError(f"plan_chunks: {nq} query heads over {nkv} kv heads is not supported")
    slots = [c[2] for c in chunks]
    if len(set(slots)) != len(slots):
        raise ValueError("plan_chunks: at most one chunk per slot (a slot's chunks must run in order)")
    tq = 64 // (nq // nkv)
    tiles: list[list[int]] = []
    end = 0
    for row0, n, slot in chunks:
        if n < 1 or row0 < end:
            raise ValueError(f"plan_chunks: chunk rows must be ascending, disjoint and non-empty, got {chunks}")
        end = row0 + n
        tiles += [[row0 + j, min(tq, n - j), slot, j] for j in range(0, n, tq)]
    per_row = ext().attention_tiled_workspace_floats(1, nq, hd, max_len)
    cap_rows = max(tq, PREFILL_WORKSPACE_FLOATS // per_row) if per_row else 1 << 30
    launches, i0 = [], 0
    for i in range(1, len(tiles) + 1):
        if i == len(tiles) or tiles[i][0] + tiles[i][1] - tiles[i0][0] > cap_rows:
            r0, r1 = tiles[i0][0], tiles[i - 1][0] + tiles[i - 1][1]
            launches.append((i0, i, r0, r1 - r0))
            i0 = i
    # through pinned memory: a pageable copy would make the host wait for the whole stream (the serving runner
    # prepares the next step while the GPU runs this one)
    t = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 4)
    if torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return PrefillChunks(t, tuple(launches), nq, nkv, hd, max_len)


def attention_chunks(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, start: torch.Tensor,
                     plan: PrefillChunks, out: torch.Tensor) -> torch.Tensor:
    """Variant 2 of `attention` over several prompts' chunks in one launch (per workspace block): row r of a chunk
    (first row a, slot s) is at position start[s] + (r - a) and attends over pools [num_slots, nkv, max_len, hd]
    slot s. Each query gets the bits `attention` gives it on its chunk alone. Rows outside the chunks are left
    as they are in `out`."""
    nq, nkv, hd = plan.nq, plan.nkv, plan.hd
    _check(qkv, "qkv", (torch.float32,), 2)
    _check(out, "out", (torch.float32,), 2)
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        _check(pool, name, (torch.float32, torch.bfloat16), 4)
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
        raise ValueError("k_pool and v_pool must have the same shape and dtype")
    num_slots, max_len = k_pool.shape[0], k_pool.shape[2]
    if k_pool.shape[1] != nkv or k_pool.shape[3] != hd or max_len != plan.max_len:
        raise ValueError(f"pools must be [slots, {nkv}, {plan.max_len}, {hd}], got {tuple(k_pool.shape)}")
    _check(start, "start", (torch.int32,), 1)
    if start.shape[0] < num_slots:
        raise ValueError(f"start must hold a position per slot ({num_slots}), got {start.shape[0]}")
    if qkv.shape[1] < (nq + 2 * nkv) * hd or out.shape[1] != nq * hd or out.shape[0] != qkv.shape[0]:
        raise ValueError(f"qkv [T, >= {(nq + 2 * nkv) * hd}] and out [T, {nq * hd}] needed, got "
                         f"{tuple(qkv.shape)} and {tuple(out.shape)}")
    if plan.launches and plan.launches[-1][2] + plan.launches[-1][3] > qkv.shape[0]:
        raise ValueError(f"the chunks reach row {plan.launches[-1][2] + plan.launches[-1][3]}, qkv has "
                         f"{qkv.shape[0]}")
    per_row = ext().attention_tiled_workspace_floats(1, nq, hd, max_len)
    rows = max((n for *_, n in plan.launches), default=0)
    ws = _prefill_workspace(qkv.device, rows * per_row) if per_row and rows else None
    for i0, i1, r0, n in plan.launches:
        ext().attention_tiled_chunks(qkv.data_ptr(), qkv.shape[1], plan.tiles[i0].data_ptr(), i1 - i0, r0, n, nq,
                                     nkv, hd, k_pool.data_ptr(), v_pool.data_ptr(), DTYPE_CODE[k_pool.dtype], max_len,
                                     nkv * max_len * hd, start.data_ptr(), out.data_ptr(),
                                     ws.data_ptr() if ws is not None else 0, n * per_row, _stream())
    return out


# Split plan of attention_decode: a row of len positions uses min(max_splits, ceil(len / min_chunk)) blocks
# per kv head. DEFAULT_MAX_SPLITS caps the merge (the last block reads every split's record).
# One sequence (GpuModel) is latency-bound: chunks of one kernel tile (32 positions at hd 128), so a short
# context costs each CTA exactly one tile. Many rows (the batched runner) are bound by the total work: chunks
# of 64 halve the CTAs and split records per row (at B = 16, 1k context: 48 us with 64, 67 us with 32).
DEFAULT_MIN_CHUNK = 32
BATCHED_MIN_CHUNK = 64
# 48 splits x 5 kv heads (2B4T) = 240 CTAs: one wave at 2 CTAs per SM on 132 SMs (64 would need two).
DEFAULT_MAX_SPLITS = 48
MAX_SPLITS_LIMIT = 128  # the kernel's bound


@dataclass
class AttentionWorkspace:
    """Scratch of attention_decode for up to max_batch rows: per-split partial results and one arrival
    counter per (row, kv head), zero between launches (the merging block resets it). One workspace serves
    one launch at a time (calls on one stream, or one graph).

    The split plan depends only on a row's length, max_splits and min_chunk, so results are bit-identical
    across batch sizes for workspaces with equal (max_splits, min_chunk). create() picks
    max_splits = min(DEFAULT_MAX_SPLITS, ceil(max_len / min_chunk)): for any len <= max_len the plan is
    then min(DEFAULT_MAX_SPLITS, ceil(len / min_chunk)), independent of max_len too."""

    partials: torch.Tensor  # fp32 [max_batch * nq * max_splits * record_floats(hd)]
    counters: torch.Tensor  # int32 [max_batch * nkv]
    max_batch: int
    nq: int
    nkv: int
    hd: int
    max_splits: int
    min_chunk: int

    @staticmethod
    def record_floats(hd: int) -> int:
        """One split's record per head: max, sum, 2 pad, acc[hd rounded up to 4] (16-byte vector reads)."""
        return -(-hd // 4) * 4 + 4

    @classmethod
    def create(cls, max_batch: int, nq: int, nkv: int, hd: int, max_len: int,
               device: str | torch.device = "cuda", *, min_chunk: int = DEFAULT_MIN_CHUNK,
               max_splits: int | None = None) -> "AttentionWorkspace":
        for name, v in (("max_batch", max_batch), ("nq", nq), ("nkv", nkv), ("hd", hd), ("max_len", max_len),
                        ("min_chunk", min_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_splits is None:
            max_splits = min(DEFAULT_MAX_SPLITS, -(-max_len // min_chunk))
        if not isinstance(max_splits, int) or not 1 <= max_splits <= MAX_SPLITS_LIMIT:
            raise ValueError(f"max_splits must be an int in [1, {MAX_SPLITS_LIMIT}], got {max_splits!r}")
        partials = torch.empty(max_batch * nq * max_splits * cls.record_floats(hd), dtype=torch.float32,
                               device=device)
        counters = torch.zeros(max_batch * nkv, dtype=torch.int32, device=device)
        return cls(partials, counters, max_batch, nq, nkv, hd, max_splits, min_chunk)


def _check_slot_cache(kc: torch.Tensor, vc: torch.Tensor, nkv: int, hd: int) -> tuple[int, int]:
    """Caches [S, nkv, max_len, hd] (or one sequence's [nkv, max_len, hd]) -> (S, max_len)."""
    for name, c in (("k_cache", kc), ("v_cache", vc)):
        _check(c, name, (torch.float32, torch.bfloat16))
        if c.dim() not in (3, 4):
            raise ValueError(f"{name} must be [slots, {nkv}, max_len, {hd}] or [{nkv}, max_len, {hd}], "
                             f"got {tuple(c.shape)}")
    if kc.shape != vc.shape or kc.dtype != vc.dtype or kc.device != vc.device:
        raise ValueError("k_cache and v_cache must have the same shape, dtype and device")
    shape = tuple(kc.shape) if kc.dim() == 4 else (1, *kc.shape)
    if shape[1] != nkv or shape[3] != hd or shape[0] < 1 or shape[2] < 1:
        raise ValueError(f"cache must be [slots, {nkv}, max_len, {hd}], got {tuple(kc.shape)}")
    return shape[0], shape[2]


def _check_rows(qkv: torch.Tensor, nq: int, nkv: int, hd: int, positions: torch.Tensor, slots: torch.Tensor,
                cache: torch.Tensor) -> int:
    for name, v in (("nq", nq), ("nkv", nkv), ("hd", hd)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if nq % nkv or nq // nkv > 8 or hd > 128:
        raise ValueError(f"need nq a multiple of nkv with nq/nkv <= 8 and hd <= 128 (nq={nq}, nkv={nkv}, hd={hd})")
    _check(qkv, "qkv", (torch.float32,), 2)
    b = qkv.shape[0]
    if qkv.shape[1] < (nq + 2 * nkv) * hd:
        raise ValueError(f"qkv rows have {qkv.shape[1]} values, need {(nq + 2 * nkv) * hd}")
    for name, t in (("positions", positions), ("slots", slots)):
        _check(t, name, (torch.int32,), 1)
        if t.shape[0] != b:
            raise ValueError(f"{name} must have one entry per qkv row ({b}), got {t.shape[0]}")
    for name, t in (("positions", positions), ("slots", slots), ("k_cache", cache)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, qkv on {qkv.device}")
    return b


def _check_rope_tables(cos_t: torch.Tensor, sin_t: torch.Tensor, max_len: int, hd: int,
                       device: torch.device) -> None:
    if hd % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {hd}")
    for name, tab in (("cos_t", cos_t), ("sin_t", sin_t)):
        _check(tab, name, (torch.float32,), 2)
        if tab.shape[0] < max_len or tab.shape[1] != hd // 2:
            raise ValueError(f"{name} must be [>= {max_len}, {hd // 2}], got {tuple(tab.shape)}")
        if tab.device != device:
            raise ValueError(f"{name} is on {tab.device}, qkv on {device}")


def rope_append_batch(qkv: torch.Tensor, nq: int, nkv: int, hd: int, cos_t: torch.Tensor, sin_t: torch.Tensor,
                      positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor) -> None:
    """qkv [B, >= (nq + 2 nkv) hd] fp32, row b at position positions[b] of cache slot slots[b] (int32 [B] on
    the device): rotate q in place, write rotated k and raw v into the caches [S, nkv, max_len, hd] (or
    [nkv, max_len, hd] = one slot) at (slots[b], :, positions[b]). Same fp32 operations as rope_append.
    Rows whose position or slot is out of range (device values, not checked here: that would sync) are
    skipped."""
    num_slots, max_len = _check_slot_cache(k_cache, v_cache, nkv, hd)
    b = _check_rows(qkv, nq, nkv, hd, positions, slots, k_cache)
    _check_rope_tables(cos_t, sin_t, max_len, hd, qkv.device)
    ext().rope_append_batch(qkv.data_ptr(), qkv.shape[1], b, nq, nkv, hd, cos_t.data_ptr(), sin_t.data_ptr(),
                            positions.data_ptr(), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                            DTYPE_CODE[k_cache.dtype], num_slots, max_len, _stream())


def attention_decode(qkv: torch.Tensor, nq: int, nkv: int, hd: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None,
                     workspace: AttentionWorkspace,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Batched decode attention: row b's query heads (rotated q at the start of qkv row b) attend over
    positions [0, positions[b]] of cache slot slots[b] (inclusive: the token was just appended). Caches
    [S, nkv, max_len, hd] (or [nkv, max_len, hd]) fp32/bf16. Returns fp32 out [B, nq*hd]. A row whose
    position is negative or whose slot is out of range gets NaN (device values are not checked here);
    positions past the cache are clamped to max_len - 1.

    rope=(cos_t, sin_t) fuses rope_append_batch in: qkv holds the raw q|k|v (left unchanged), q is rotated
    on the fly, and the rotated k and v are written at positions[b] and attended with, bit-identically to
    rope_append_batch followed by the unfused call (one kernel launch instead of two per layer)."""
    num_slots, max_len = _check_slot_cache(k_cache, v_cache, nkv, hd)
    b = _check_rows(qkv, nq, nkv, hd, positions, slots, k_cache)
    cos_ptr = sin_ptr = 0
    if rope is not None:
        cos_t, sin_t = rope
        _check_rope_tables(cos_t, sin_t, max_len, hd, qkv.device)
        cos_ptr, sin_ptr = cos_t.data_ptr(), sin_t.data_ptr()
    if not isinstance(workspace, AttentionWorkspace):
        raise TypeError(f"workspace must be an AttentionWorkspace, got {type(workspace).__name__}")
    ws = workspace
    if (ws.nq, ws.nkv, ws.hd) != (nq, nkv, hd):
        raise ValueError(f"workspace is for (nq, nkv, hd) = {(ws.nq, ws.nkv, ws.hd)}, got {(nq, nkv, hd)}")
    if b > ws.max_batch:
        raise ValueError(f"batch of {b} rows exceeds the workspace's max_batch {ws.max_batch}")
    _check(ws.partials, "workspace.partials", (torch.float32,), 1)
    if ws.partials.data_ptr() % 16:
        raise ValueError("workspace.partials must be 16-byte aligned")
    _check(ws.counters, "workspace.counters", (torch.int32,), 1)
    if (ws.partials.numel() < ws.max_batch * nq * ws.max_splits * ws.record_floats(hd)
            or ws.counters.numel() < ws.max_batch * nkv):
        raise ValueError("workspace buffers are smaller than its parameters say")
    if ws.partials.device != qkv.device or ws.counters.device != qkv.device:
        raise ValueError(f"workspace is on {ws.partials.device}, qkv on {qkv.device}")
    if out is None:
        out = torch.empty((b, nq * hd), dtype=torch.float32, device=qkv.device)
    _check(out, "out", (torch.float32,), 2)
    if tuple(out.shape) != (b, nq * hd) or out.device != qkv.device:
        raise ValueError(f"out must be [{b}, {nq * hd}] on {qkv.device}, got {tuple(out.shape)} on {out.device}")
    ext().attention_decode(qkv.data_ptr(), qkv.shape[1], b, nq, nkv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                           DTYPE_CODE[k_cache.dtype], num_slots, max_len, positions.data_ptr(), slots.data_ptr(),
                           cos_ptr, sin_ptr, out.data_ptr(), ws.partials.data_ptr(), ws.counters.data_ptr(),
                           ws.max_splits,
                           ws.min_chunk, _stream())
    return out


# Lab switch (like QSPARSE_PDL): QSPARSE_FUSED_ROPE=0 runs RoPE + KV append as its own kernel before the
# decode attention, to measure the fusion (bench/NOTES-latency.md, session 4).
FUSED_ROPE = os.environ.get("QSPARSE_FUSED_ROPE", "1") != "0"


def rope_append_attention(qkv: torch.Tensor, nq: int, nkv: int, hd: int, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, out: torch.Tensor,
                          workspace: AttentionWorkspace, cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
    """A decode step's RoPE + KV append + attention over qkv [B, ...] (the decoders' one entry point): the
    fused kernel, or with FUSED_ROPE off rope_append_batch followed by the unfused kernel. Bit-identical
    either way (tests/kernels/test_attention_gpu.py); the fused path leaves q unrotated in qkv."""
    if FUSED_ROPE:
        return attention_decode(qkv, nq, nkv, hd, k_cache, v_cache, positions, slots, out, workspace,
                                rope=(cos_t, sin_t))
    rope_append_batch(qkv, nq, nkv, hd, cos_t, sin_t, positions, k_cache, v_cache, slots)
    return attention_decode(qkv, nq, nkv, hd, k_cache, v_cache, positions, slots, out, workspace)

def _head_io(x: torch.Tensor, v: int, h: int, norm_weight: torch.Tensor | None,
             out: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """The checks both LM heads share: x [T, h] fp32, the optional norm weight [h], out [T, v] (allocated when
    None). Returns (norm weight pointer or 0, out)."""
    _check(x, "x", (torch.float32,), 2)
    if x.shape[1] != h:
        raise ValueError(f"x rows have {x.shape[1]} values, the head expects {h}")
    nptr = 0
    if norm_weight is not None:
        _check(norm_weight, "norm_weight", (torch.float32,), 1)
        if norm_weight.shape[0] != h:
            raise ValueError(f"norm_weight must have {h} elements")
        nptr = norm_weight.data_ptr()
    if out is None:
        out = torch.empty((x.shape[0], v), dtype=torch.float32, device=x.device)
    _check(out, "out", (torch.float32,), 2)
    if tuple(out.shape) != (x.shape[0], v):
        raise ValueError(f"out must be [{x.shape[0]}, {v}], got {tuple(out.shape)}")
    return nptr, out


def lm_head(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] fp32, weight [V, H] (bf16/fp16/fp32) -> fp32 logits [T, V]; RMSNorm(x)*norm_weight first
    when norm_weight is given."""
    _check(weight, "weight", tuple(DTYPE_CODE), 2)
    v, h = weight.shape
    nptr, out = _head_io(x, v, h, norm_weight, out)
    ext().lm_head(x.data_ptr(), nptr, float(eps), weight.data_ptr(), DTYPE_CODE[weight.dtype], x.shape[0], v, h,
                  out.data_ptr(), _stream())
    return out


def lm_head_mma_supported(weight: torch.Tensor) -> bool:
    """Whether lm_head_mma serves this head: bf16 [V, H] with H a multiple of 128."""
    return weight.dtype == torch.bfloat16 and weight.dim() == 2 and bool(ext().lm_head_mma_supported(weight.shape[1]))


def lm_head_mma(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor-core head of batched decode: as lm_head for a bf16 weight [V, H] (H % 128 == 0), fp32 logits
    within ~1e-5 relative of lm_head's; a row's logits are bit-identical for any number of rows in the call."""
    _check(weight, "weight", (torch.bfloat16,), 2)
    v, h = weight.shape
    if not lm_head_mma_supported(weight):
        raise ValueError(f"lm_head_mma needs a hidden size that is a multiple of 128, got {h}")
    nptr, out = _head_io(x, v, h, norm_weight, out)
    ws = torch.empty((2, x.shape[0], h), dtype=torch.bfloat16, device=x.device)  # xn as hi + lo bf16 terms
    ext().lm_head_mma(x.data_ptr(), nptr, float(eps), weight.data_ptr(), x.shape[0], v, h, out.data_ptr(),
                      ws.data_ptr(), _stream())
    return out


def lm_head_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 head (head_int8.py): x [T, H] fp32, q [V, H] int8, scales [V] fp32 -> fp32 logits [T, V]
    = scales * (xn @ q^T), xn = RMSNorm(x)*norm_weight when norm_weight is given, else x."""
    _check(q, "q", (torch.int8,), 2)
    _check(scales, "scales", (torch.float32,), 1)
    v, h = q.shape
    if scales.shape[0] != v:
        raise ValueError(f"scales must have {v} entries, got {scales.shape[0]}")
    nptr, out = _head_io(x, v, h, norm_weight, out)
    ext().lm_head_int8(x.data_ptr(), nptr, float(eps), q.data_ptr(), scales.data_ptr(), x.shape[0], v, h,
                       out.data_ptr(), _stream())
    return out


def sample(logits: torch.Tensor, seen: torch.Tensor, fparams: torch.Tensor, iparams: torch.Tensor,
           rng: torch.Tensor, pos: torch.Tensor, token: torch.Tensor, history: torch.Tensor | None = None,
           advance: int = 1) -> None:
    """Pick one token from logits [V] fp32 on the GPU (rules: qsparse_infer/generate/sampling.py). Device buffers:
    seen uint8 [V], fparams fp32 [3] (temperature, top_p, repetition_penalty), iparams int32 [1] (top_k),
    rng int64 [2] (seed, step; step += 1), pos int32 [1] (+= advance), token int32 [1] (written),
    history int32 [n] (history[pos + advance] = token)."""
    _check(logits, "logits", (torch.float32,))
    v = logits.numel()
    _check(seen, "seen", (torch.uint8,), 1)
    if seen.numel() != v:
        raise ValueError(f"seen must have {v} entries")
    _check(fparams, "fparams", (torch.float32,), 1)
    _check(iparams, "iparams", (torch.int32,), 1)
    _check(rng, "rng", (torch.int64,), 1)
    _check(pos, "pos", (torch.int32,), 1)
    _check(token, "token", (torch.int32,), 1)
    if fparams.numel() < 3 or iparams.numel() < 1 or rng.numel() < 2:
        raise ValueError("fparams needs 3 values, iparams 1, rng 2")
    hptr, hlen = 0, 0
    if history is not None:
        _check(history, "history", (torch.int32,), 1)
        hptr, hlen = history.data_ptr(), history.numel()
    ext().sample(logits.data_ptr(), v, seen.data_ptr(), fparams.data_ptr(), iparams.data_ptr(), rng.data_ptr(),
                 pos.data_ptr(), int(advance), token.data_ptr(), hptr, hlen, _stream())


def sample_batch(logits: torch.Tensor, seen: torch.Tensor, fparams: torch.Tensor, iparams: torch.Tensor,
                 rng: torch.Tensor, pos: torch.Tensor, token: torch.Tensor, slots: torch.Tensor | None = None,
                 history: torch.Tensor | None = None, advance: int = 1, counts: torch.Tensor | None = None,
                 penalties: torch.Tensor | None = None) -> None:
    """One token per row of logits [B, V] fp32 in one launch, by the rules of `sample` and with the same
    random numbers. Row b uses the state of sequence r = slots[b] (int32 [B] on the GPU; None: r = b):
    seen uint8 [S, V], fparams fp32 [S, 3], iparams int32 [S], rng int64 [S, 2], pos int32 [S] (+= advance),
    token int32 [S] (written), history int32 [S, n] (optional). Rows naming the same r race on its state
    (allowed for discarded padding rows only). counts int32 [S, V] (optional): generated-token counts, += 1
    at the sampled token; with penalties fp32 [S, 2] = (presence, frequency) per sequence, OpenAI's additive
    penalties apply (sampling.py rule 1)."""
    _check(logits, "logits", (torch.float32,), 2)
    b, v = logits.shape
    _check(seen, "seen", (torch.uint8,), 2)
    s = seen.shape[0]
    if seen.shape[1] != v:
        raise ValueError(f"seen must be [S, {v}], got {tuple(seen.shape)}")
    for name, t, dt, shape in (("fparams", fparams, torch.float32, (s, 3)), ("iparams", iparams, torch.int32, (s,)),
                               ("rng", rng, torch.int64, (s, 2)), ("pos", pos, torch.int32, (s,)),
                               ("token", token, torch.int32, (s,))):
        _check(t, name, (dt,), len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    sptr = 0
    if slots is None:
        if b > s:
            raise ValueError(f"{b} rows but state for only {s} sequences (pass slots)")
    else:
        _check(slots, "slots", (torch.int32,), 1)
        if slots.numel() != b:
            raise ValueError(f"slots must have {b} entries, got {slots.numel()}")
        sptr = slots.data_ptr()  # values are not range-checked here (that would sync): the caller owns them
    hptr, hlen = 0, 0
    if history is not None:
        _check(history, "history", (torch.int32,), 2)
        if history.shape[0] != s:
            raise ValueError(f"history must be [{s}, n], got {tuple(history.shape)}")
        hptr, hlen = history.data_ptr(), history.shape[1]
    cptr = pptr = 0
    if counts is not None:
        _check(counts, "counts", (torch.int32,), 2)
        if tuple(counts.shape) != (s, v):
            raise ValueError(f"counts must be [{s}, {v}], got {tuple(counts.shape)}")
        cptr = counts.data_ptr()
    if penalties is not None:
        if counts is None:
            raise ValueError("penalties need counts")
        _check(penalties, "penalties", (torch.float32,), 2)
        if tuple(penalties.shape) != (s, 2):
            raise ValueError(f"penalties must be [{s}, 2], got {tuple(penalties.shape)}")
        pptr = penalties.data_ptr()
    ext().sample_batch(logits.data_ptr(), b, v, sptr, seen.data_ptr(), fparams.data_ptr(), iparams.data_ptr(),
                       rng.data_ptr(), pos.data_ptr(), int(advance), token.data_ptr(), hptr, hlen, cptr, pptr,
                       _stream())
