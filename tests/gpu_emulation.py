"""Run GpuBatchRunner's Python on the CPU: every kernel it calls is replaced by a plain-torch twin that follows
the same contract (same arguments, same buffers written, rows computed independently), CUDA events and pinned
memory by no-ops. This checks the runner's bookkeeping (slots, positions, states, row layout of mixed steps,
logprob rows, penalties state, the asynchronous protocol) on any machine; the kernels' numerics are tested
against the reference on the GPU (tests/serving/test_serving_gpu.py and tests/kernels/).

Usage: `with emulated_gpu(monkeypatch): runner = GpuBatchRunner(ef, max_slots=4, max_len=64, use_graph=False)`.
"""
from __future__ import annotations

import contextlib
import math

import torch

from qsparse_infer import packing
from qsparse_infer.generate.sampling import SamplingSettings, sample_cpu
from qsparse_infer.kernels import decode as dk
from qsparse_infer.kernels import linear as lk
from qsparse_infer.model.quant import bitlinear
from qsparse_infer.model.reference import glu as ref_glu
from qsparse_infer.serving import gpu_io, gpu_runner

_unpacked: dict[int, list[torch.Tensor]] = {}


def _segments(w: lk.PackedTernary) -> list[torch.Tensor]:
    key = id(w.packed)
    if key not in _unpacked:
        full = packing.unpack_ternary(w.packed.cpu(), list(w.segment_sizes), w.layout)
        # kept as floats (exact small integers): bitlinear's int_matmul then converts nothing per call
        _unpacked[key] = [t.float() for t in torch.split(full, list(w.segment_sizes), 0)]
    return _unpacked[key]


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def ternary_linear(x, w, k, *, norm_weight=None, norm_eps=1e-5, residual=None, glu=None, out=None, _path=None,
                   **_):
    assert _path in (None, "t1", "gemv", "gemm")
    xn = _rms(x, norm_weight, norm_eps) if norm_weight is not None else x.float()
    ys = [bitlinear(xn, t, beta, k) for t, beta in zip(_segments(w), w.scales.tolist())]
    if glu is not None:
        y = ref_glu(ys[0], ys[1], glu)
    else:
        y = torch.cat(ys, -1)
        if residual is not None:
            y = residual + y
    if out is None:
        return y
    out.copy_(y)
    return out


def embedding(table, ids, out=None):
    y = table[ids.long()].float()
    if out is None:
        return y
    out.copy_(y)
    return out


def rmsnorm(x, weight, eps, out=None):
    y = _rms(x, weight, eps)
    if out is None:
        return y
    out.copy_(y)
    return out


def _head(x, weight, norm_weight=None, eps=1e-5, out=None):
    xn = _rms(x, norm_weight, eps) if norm_weight is not None else x.float()
    w = weight.float()
    y = torch.cat([xn[r:r + 1].clone() @ w.t() for r in range(xn.shape[0])]) if xn.shape[0] else xn @ w.t()
    if out is None:
        return y
    out.copy_(y)
    return out


def _rotate(x, cos_half, sin_half):  # x [heads, hd] at one position; tables [hd/2]
    half = x.shape[-1] // 2
    cos, sin = torch.cat([cos_half, cos_half]), torch.cat([sin_half, sin_half])
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


def _attend_row(q, kc, vc, p, nq, nkv, hd):  # q [nq, hd]; caches [nkv, L, hd]; keys 0..p
    g = nq // nkv
    k = kc[:, :p + 1].float().repeat_interleave(g, 0)
    v = vc[:, :p + 1].float().repeat_interleave(g, 0)
    s = torch.einsum("hd,hsd->hs", q, k) / math.sqrt(hd)
    return torch.einsum("hs,hsd->hd", s.softmax(-1), v).reshape(-1)


def rope_append(qkv, nq, nkv, hd, cos_t, sin_t, start, k_cache, v_cache):
    p0 = int(start[0])
    for t in range(qkv.shape[0]):
        p = p0 + t
        row = qkv[t]
        q = row[:nq * hd].view(nq, hd)
        k = row[nq * hd:(nq + nkv) * hd].view(nkv, hd)
        v = row[(nq + nkv) * hd:(nq + 2 * nkv) * hd].view(nkv, hd)
        q.copy_(_rotate(q, cos_t[p], sin_t[p]))
        k_cache[:, p] = _rotate(k, cos_t[p], sin_t[p]).to(k_cache.dtype)
        v_cache[:, p] = v.to(v_cache.dtype)


def attention(qkv, nq, nkv, hd, k_cache, v_cache, start, out=None):
    p0 = int(start[0])
    y = torch.stack([_attend_row(qkv[t, :nq * hd].view(nq, hd), k_cache, v_cache, p0 + t, nq, nkv, hd)
                     for t in range(qkv.shape[0])])
    if out is None:
        return y
    out.copy_(y)
    return out


def plan_chunks(chunks, nq, nkv, hd, max_len, device):
    return [tuple(c) for c in chunks]


def attention_chunks(qkv, k_pool, v_pool, start, plan, out):
    nkv, hd = k_pool.shape[1], k_pool.shape[3]
    nq = out.shape[1] // hd
    for row0, n, slot in plan:
        attention(qkv[row0:row0 + n], nq, nkv, hd, k_pool[slot], v_pool[slot], start[slot:slot + 1],
                  out=out[row0:row0 + n])
    return out


def rope_append_attention(qkv, nq, nkv, hd, k_cache, v_cache, positions, slots, out, workspace, cos_t, sin_t):
    for b in range(qkv.shape[0]):
        p, s = int(positions[b]), int(slots[b])
        row = qkv[b]
        q = _rotate(row[:nq * hd].view(nq, hd), cos_t[p], sin_t[p])
        k = _rotate(row[nq * hd:(nq + nkv) * hd].view(nkv, hd), cos_t[p], sin_t[p])
        v = row[(nq + nkv) * hd:(nq + 2 * nkv) * hd].view(nkv, hd)
        k_cache[s, :, p] = k.to(k_cache.dtype)
        v_cache[s, :, p] = v.to(v_cache.dtype)
        out[b] = _attend_row(q, k_cache[s], v_cache[s], p, nq, nkv, hd)
    return out


def sample_batch(logits, seen, fparams, iparams, rng, pos, token, slots=None, history=None, advance=1, counts=None,
                 penalties=None):
    for b in range(logits.shape[0]):
        r = int(slots[b]) if slots is not None else b
        temp, top_p, rp = fparams[r].tolist()
        pp, fp = penalties[r].tolist() if penalties is not None else (0.0, 0.0)
        settings = SamplingSettings(temp, int(iparams[r]), top_p, rp, None, pp, fp)
        tok = sample_cpu(logits[b], settings, seen[r].bool(), int(rng[r, 0]), int(rng[r, 1]),
                         counts[r] if counts is not None else None)
        token[r] = tok
        seen[r, tok] = 1
        if counts is not None:
            counts[r, tok] += 1
        pos[r] += advance
        rng[r, 1] += 1


class _Event:
    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def emulated_gpu(monkeypatch):
    monkeypatch.setattr(lk, "ternary_linear", ternary_linear)
    for name, fn in (("embedding", embedding), ("rmsnorm", rmsnorm), ("rope_append", rope_append),
                     ("attention", attention), ("rope_append_attention", rope_append_attention),
                     ("plan_chunks", plan_chunks), ("attention_chunks", attention_chunks),
                     ("sample_batch", sample_batch), ("lm_head", _head), ("lm_head_mma", _head)):
        monkeypatch.setattr(dk, name, fn)
    monkeypatch.setattr(dk, "lm_head_mma_supported", lambda w: w.dtype == torch.bfloat16)
    monkeypatch.setattr(gpu_runner, "decode_settings",
                        lambda cfg, max_len, kv_dtype, device: (int(max_len or cfg.max_seq_len), torch.device("cpu")))
    monkeypatch.setattr(gpu_runner.GpuBatchRunner, "_fit_slots", lambda self, ef, shared, m: m or 4)
    monkeypatch.setattr(gpu_io, "new_event", lambda: _Event())
    yield
