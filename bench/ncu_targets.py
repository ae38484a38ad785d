"""Nsight Compute target (lab tool, not a benchmark): two calls each of the decode-step kernels whose time is
far above their floors at the 2B4T shape (issue 8), so that `ncu -k regex:...` can show where a call's time
goes, down to SASS lines (`--page source`):
- attention_decode at 256 context, B = 1 (12.8 us per layer in the decode profile; floor ~2 us);
- greedy sampling over a 128,256-entry vocabulary (~35 us per step; floor ~2 us);
- the one-token GEMV at S = 0.6 for gate_up (2560 -> 2 x 6912, GLU) and down (6912 -> 2560), fused norm.

    ncu ... python3 bench/ncu_targets.py
"""
from __future__ import annotations

import torch

from qsparse_infer import decode_kernels as dk
from qsparse_infer import linear_kernels as lk
from qsparse_infer import quant
from qsparse_infer.config import topk_count

NQ, NKV, HD, CTX, VOCAB = 20, 5, 128, 256, 128256
g = torch.Generator(device="cuda").manual_seed(0)


def attention() -> None:
    kc = torch.randn(1, NKV, CTX, HD, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(1, NKV, CTX, HD, device="cuda", generator=g).to(torch.bfloat16)
    qkv = torch.randn(1, (NQ + 2 * NKV) * HD, device="cuda", generator=g)
    pos = torch.full((1,), CTX - 1, dtype=torch.int32, device="cuda")
    slot = torch.zeros(1, dtype=torch.int32, device="cuda")
    ws = dk.AttentionWorkspace.create(1, NQ, NKV, HD, CTX, "cuda")
    for _ in range(2):
        dk.attention_decode(qkv, NQ, NKV, HD, kc, vc, pos, slot, None, ws)


def sampling() -> None:
    logits = torch.randn(VOCAB, device="cuda", generator=g)
    seen = torch.zeros(VOCAB, dtype=torch.uint8, device="cuda")
    fparams = torch.tensor([0.0, 1.0, 1.0], device="cuda")  # greedy
    iparams = torch.zeros(1, dtype=torch.int32, device="cuda")
    rng = torch.zeros(2, dtype=torch.int64, device="cuda")
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    token = torch.zeros(1, dtype=torch.int32, device="cuda")
    for _ in range(2):
        dk.sample(logits, seen, fparams, iparams, rng, pos, token)


def projection(d: int, segs: list[int], glu: str | None) -> None:
    layout = "interleave" if glu else "concat"
    rb = quant.packed_columns(segs, layout) // 4
    c = torch.randint(0, 3, (d, rb, 4), device="cuda", dtype=torch.uint8, generator=g)
    w = lk.PackedTernary((c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous(),
                         torch.rand(len(segs), device="cuda", generator=g) + 0.5, segs, layout)
    x = torch.randn(1, d, device="cuda", generator=g)
    nw = torch.rand(d, device="cuda", generator=g) + 0.5
    for _ in range(2):
        lk.ternary_linear(x, w, topk_count(d, 0.6), norm_weight=nw, glu=glu)


attention()
sampling()
projection(2560, [6912, 6912], "silu")
projection(6912, [2560], None)
torch.cuda.synchronize()
print("done")
