"""Python wrappers of the decoder kernels (csrc/decode_*.cu): validate tensors, then pass raw pointers and
the current CUDA stream to _C. They allocate nothing unless `out` is omitted, and never synchronize, so a
sequence of calls can be captured in a CUDA graph (the kernels read positions from device buffers)."""
from __future__ import annotations

import torch

from ._ext import ext

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


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


def attention(qkv: torch.Tensor, nq: int, nkv: int, hd: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
              start: torch.Tensor, out: torch.Tensor | None = None, nsplit: int = 1,
              workspace: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the T query rows of qkv (rotated q first) over the cache, query t at position
    start[0] + t. Returns fp32 [T, nq*hd]. nsplit > 1 (T == 1) needs workspace (>= nsplit*nq*(hd+2) fp32)
    and counters (int32 [nkv], zero)."""
    _check(qkv, "qkv", (torch.float32,), 2)
    max_len = _check_cache(k_cache, v_cache, nkv, hd)
    _check(start, "start", (torch.int32,), 1)
    t = qkv.shape[0]
    if out is None:
        out = torch.empty((t, nq * hd), dtype=torch.float32, device=qkv.device)
    _check(out, "out", (torch.float32,), 2)
    if tuple(out.shape) != (t, nq * hd):
        raise ValueError(f"out must be [{t}, {nq * hd}], got {tuple(out.shape)}")
    ws_ptr = cnt_ptr = 0
    if nsplit > 1:
        if workspace is None or counters is None:
            raise ValueError("nsplit > 1 needs a workspace and counters")
        _check(workspace, "workspace", (torch.float32,))
        _check(counters, "counters", (torch.int32,), 1)
        if workspace.numel() < nsplit * nq * (hd + 2) or counters.numel() < nkv:
            raise ValueError("workspace or counters too small for nsplit")
        ws_ptr, cnt_ptr = workspace.data_ptr(), counters.data_ptr()
    ext().attention(qkv.data_ptr(), qkv.shape[1], t, nq, nkv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                    DTYPE_CODE[k_cache.dtype], max_len, start.data_ptr(), out.data_ptr(), int(nsplit), ws_ptr,
                    cnt_ptr, _stream())
    return out


def lm_head(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] fp32, weight [V, H] (bf16/fp16/fp32) -> fp32 logits [T, V]; RMSNorm(x)*norm_weight first
    when norm_weight is given."""
    _check(x, "x", (torch.float32,), 2)
    _check(weight, "weight", tuple(DTYPE_CODE), 2)
    v, h = weight.shape
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
    ext().lm_head(x.data_ptr(), nptr, float(eps), weight.data_ptr(), DTYPE_CODE[weight.dtype], x.shape[0], v, h,
                  out.data_ptr(), _stream())
    return out


def lm_head_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 head (head_int8.py): x [T, H] fp32, q [V, H] int8, scales [V] fp32 -> fp32 logits [T, V]
    = scales * (xn @ q^T), xn = RMSNorm(x)*norm_weight when norm_weight is given, else x."""
    _check(x, "x", (torch.float32,), 2)
    _check(q, "q", (torch.int8,), 2)
    _check(scales, "scales", (torch.float32,), 1)
    v, h = q.shape
    if x.shape[1] != h:
        raise ValueError(f"x rows have {x.shape[1]} values, the head expects {h}")
    if scales.shape[0] != v:
        raise ValueError(f"scales must have {v} entries, got {scales.shape[0]}")
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
    ext().lm_head_int8(x.data_ptr(), nptr, float(eps), q.data_ptr(), scales.data_ptr(), x.shape[0], v, h,
                       out.data_ptr(), _stream())
    return out


def sample(logits: torch.Tensor, seen: torch.Tensor, fparams: torch.Tensor, iparams: torch.Tensor,
           rng: torch.Tensor, pos: torch.Tensor, token: torch.Tensor, history: torch.Tensor | None = None,
           advance: int = 1) -> None:
    """Pick one token from logits [V] fp32 on the GPU (rules: qsparse_infer/sampling.py). Device buffers:
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
