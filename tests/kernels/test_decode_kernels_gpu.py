"""Each decoder kernel against a torch reference on the GPU: odd sizes, poisoned outputs, stated tolerances.
(The batched decode attention and rope_append_batch: test_attention_gpu.py.)

Tolerances: embedding and RoPE are exact (same fp32 operations as the reference); RMSNorm, attention and
the LM head are fp32 reductions in a different order: relative error (||out - ref|| / ||ref||, reference
in float64) <= 1e-5. Sampling: greedy is exact; temperature / top-k / top-p use the same hash as the CPU
sampler, so tokens agree except where log() differs by an ulp at a near-tie (>= 97% required).
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
from qsparse_infer.model.reference import apply_rope, rope_cos_sin  # noqa: E402
from qsparse_infer.generate.sampling import SamplingSettings, keep_threshold, sample_cpu  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]
DEV = "cuda"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten?) output"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding(dtype):
    g = torch.Generator(device=DEV).manual_seed(1)
    table = torch.randn(1001, 333, generator=g, device=DEV).to(dtype)
    ids = torch.tensor([0, 1000, 17, 17, 513], dtype=torch.int32, device=DEV)
    out = torch.full((5, 333), float("nan"), device=DEV)
    dk.embedding(table, ids, out=out)
    assert torch.equal(out, table[ids.long()].float())
    bad = torch.tensor([3, 1001], dtype=torch.int32, device=DEV)
    out2 = dk.embedding(table, bad)
    assert torch.equal(out2[0], table[3].float()) and torch.isnan(out2[1]).all()


def test_rmsnorm():
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(3, 1001, generator=g, device=DEV) * 3
    w = torch.randn(1001, generator=g, device=DEV)
    out = torch.full_like(x, float("nan"))
    dk.rmsnorm(x, w, 1e-5, out=out)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_append(cache_dtype):
    nq, nkv, hd, t, start, max_len = 6, 2, 48, 5, 7, 37
    g = torch.Generator(device=DEV).manual_seed(3)
    qkv = torch.randn(t, (nq + 2 * nkv) * hd + 8, generator=g, device=DEV)  # extra columns: stride != width
    orig = qkv.clone()
    kc = torch.full((nkv, max_len, hd), float("nan"), device=DEV, dtype=cache_dtype)
    vc = torch.full_like(kc, float("nan"))
    cos, sin = rope_cos_sin(torch.arange(max_len), hd, 10000.0)
    cos_t, sin_t = cos[:, :hd // 2].contiguous().to(DEV), sin[:, :hd // 2].contiguous().to(DEV)
    st = torch.tensor([start], dtype=torch.int32, device=DEV)
    dk.rope_append(qkv, nq, nkv, hd, cos_t, sin_t, st, kc, vc)
    c, s = rope_cos_sin(torch.arange(start, start + t), hd, 10000.0)
    o = orig.cpu()
    q_ref = apply_rope(o[:, :nq * hd].view(t, nq, hd), c, s).reshape(t, -1)
    k_ref = apply_rope(o[:, nq * hd:(nq + nkv) * hd].view(t, nkv, hd), c, s)
    v_ref = o[:, (nq + nkv) * hd:(nq + 2 * nkv) * hd].view(t, nkv, hd)
    assert torch.equal(qkv[:, :nq * hd].cpu(), q_ref)  # bit-exact: same fp32 products and sum
    assert torch.equal(qkv[:, nq * hd:].cpu(), o[:, nq * hd:])  # k/v rows of qkv untouched
    assert torch.equal(kc[:, start:start + t].cpu(), k_ref.transpose(0, 1).to(cache_dtype))
    assert torch.equal(vc[:, start:start + t].cpu(), v_ref.transpose(0, 1).to(cache_dtype))
    written = torch.zeros(max_len, dtype=torch.bool)
    written[start:start + t] = True
    assert torch.isnan(kc.cpu()[:, ~written].float()).all() and torch.isnan(vc.cpu()[:, ~written].float()).all()


def _attn_ref(q, kc, vc, start, t):
    """q [T, nq, hd]; cache [nkv, L, hd]: float64 causal GQA attention."""
    nq, nkv = q.shape[1], kc.shape[0]
    out = []
    for i in range(t):
        n = start + i + 1
        k = kc[:, :n].double().repeat_interleave(nq // nkv, 0)
        v = vc[:, :n].double().repeat_interleave(nq // nkv, 0)
        sc = torch.einsum("hd,hsd->hs", q[i].double(), k) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hs,hsd->hd", sc.softmax(-1), v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_attention_prefill_causal(cache_dtype):
    nq, nkv, hd, t, start, max_len = 12, 4, 96, 13, 5, 40
    g = torch.Generator(device=DEV).manual_seed(5)
    kc = torch.randn(nkv, max_len, hd, generator=g, device=DEV).to(cache_dtype)
    vc = torch.randn(nkv, max_len, hd, generator=g, device=DEV).to(cache_dtype)
    qkv = torch.randn(t, (nq + 2 * nkv) * hd, generator=g, device=DEV)
    st = torch.tensor([start], dtype=torch.int32, device=DEV)
    out = torch.full((t, nq * hd), float("nan"), device=DEV)
    dk.attention(qkv, nq, nkv, hd, kc, vc, st, out=out)
    ref = _attn_ref(qkv[:, :nq * hd].view(t, nq, hd).cpu(), kc.cpu(), vc.cpu(), start, t)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("h", [328, 330])  # 16-byte vector path and the scalar path
@pytest.mark.parametrize("with_norm", [True, False])
def test_lm_head(wdtype, h, with_norm):
    v, t = 1003, 2
    g = torch.Generator(device=DEV).manual_seed(6)
    w = torch.randn(v, h, generator=g, device=DEV).to(wdtype)
    x = torch.randn(t, h, generator=g, device=DEV) * 4
    nw = torch.randn(h, generator=g, device=DEV) if with_norm else None
    out = torch.full((t, v), float("nan"), device=DEV)
    dk.lm_head(x, w, norm_weight=nw, eps=1e-6, out=out)
    xd = x.double()
    if with_norm:
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    ref = xd @ w.double().t()
    assert rel_err(out, ref) < 1e-5


def _sample_state(v, temperature, top_p, rp, top_k, seed, step, pos):
    return dict(
        seen=torch.zeros(v, dtype=torch.uint8, device=DEV),
        fparams=torch.tensor([temperature, top_p, rp], dtype=torch.float32, device=DEV),
        iparams=torch.tensor([top_k], dtype=torch.int32, device=DEV),
        rng=torch.tensor([seed, step], dtype=torch.int64, device=DEV),
        pos=torch.tensor([pos], dtype=torch.int32, device=DEV),
        token=torch.full((1,), -7, dtype=torch.int32, device=DEV),
        history=torch.full((64,), -1, dtype=torch.int32, device=DEV))


def test_sample_greedy_ties_penalty_and_state():
    v = 50_000
    logits = torch.randn(v, device=DEV)
    logits[777] = 9.0
    logits[40_000] = 9.0  # tie: the lower index wins
    st = _sample_state(v, 0.0, 1.0, 1.0, 0, 1, 0, 10)
    dk.sample(logits, st["seen"], st["fparams"], st["iparams"], st["rng"], st["pos"], st["token"], st["history"],
              advance=3)
    assert int(st["token"]) == 777 and int(st["pos"]) == 13 and int(st["history"][13]) == 777
    assert int(st["seen"][777]) == 1 and int(st["seen"].sum()) == 1 and int(st["rng"][1]) == 1
    # repetition penalty 2 on the seen 777: 9 -> 4.5, so 40000 wins now
    st["fparams"][2] = 2.0
    dk.sample(logits, st["seen"], st["fparams"], st["iparams"], st["rng"], st["pos"], st["token"], st["history"])
    assert int(st["token"]) == 40_000 and int(st["pos"]) == 14


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("v", [4, 5, 4099, 128_256])
def test_sample_greedy_vector_and_tail_paths(offset, v):
    """Greedy picks the first maximum whether the logits are read as 16-byte vectors (aligned) or one by one
    (a view at offset 1..3 floats, and the V % 4 tail), with NaN logits skipped and an all -inf row -> 0."""
    g = torch.Generator(device=DEV).manual_seed(v + offset)
    buf = torch.randn(v + 4, device=DEV, generator=g)
    logits = buf[offset:offset + v]
    logits[v // 3] = float("nan")
    top = [v - 1, v // 2, v - 2] if v > 4 else [v - 1, 1]
    for i in top:  # ties across the vector part and the tail: the lowest index must win
        logits[i] = 7.5
    want = min(top)
    for row, expect in ((logits, want), (torch.full_like(logits, float("-inf")), 0)):
        st = _sample_state(v, 0.0, 1.0, 1.0, 0, 1, 0, 0)
        dk.sample(row, st["seen"], st["fparams"], st["iparams"], st["rng"], st["pos"], st["token"])
        assert int(st["token"]) == expect


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (50, 1.0), (0, 0.9), (40, 0.8), (1, 1.0)])
def test_sample_matches_cpu_rules(top_k, top_p):
    v, temp, rp, seed = 32_003, 0.7, 1.3, 99
    g = torch.Generator(device=DEV).manual_seed(7)
    settings = SamplingSettings(temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rp, seed=seed)
    agree, n = 0, 120
    for step in range(n):
        logits = torch.randn(v, generator=g, device=DEV) * 3
        st = _sample_state(v, temp, top_p, rp, top_k, seed, step, 0)
        st["seen"][:500] = 1  # penalized prefix
        dk.sample(logits, st["seen"], st["fparams"], st["iparams"], st["rng"], st["pos"], st["token"],
                  st["history"])
        tok = int(st["token"])
        seen_cpu = torch.zeros(v, dtype=torch.bool)
        seen_cpu[:500] = True
        ref = sample_cpu(logits.cpu(), settings, seen_cpu, seed, step)
        from qsparse_infer.generate.sampling import apply_repetition_penalty
        z = apply_repetition_penalty(logits.cpu(), seen_cpu, rp) / torch.tensor(temp)
        tau = keep_threshold(z, top_k, top_p)
        assert z[tok] >= tau, "GPU sampled a token outside the kept set"
        agree += tok == ref
    assert agree >= 0.97 * n, f"GPU/CPU samplers agree on {agree}/{n} draws"
