"""Nsight Compute target (lab tool, not a benchmark): two calls each of decode-step kernels, so that
`ncu -k regex:...` can show where a call's time goes, down to SASS lines (`--page source`). Parts:
- attention: attention_decode at 256 context, B = 1 (2B4T shape; 12.8 us per layer before session 4);
- sampling: greedy sampling over a 128,256-entry vocabulary;
- projections: the one-token GEMV at S = 0.6 for gate_up (2560 -> 2 x 6912, GLU) and down (6912 -> 2560),
  fused norm;
- gemv-variants: the 2B4T o_proj shape through the one-token kernel and variant 1 ("fused"), S = 0 and 0.6.

    ncu ... python3 bench/ncu_targets.py [--parts attention,sampling,projections]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import random_packed  # noqa: E402  (the kernel lab's random weights)

from qsparse_infer.kernels import decode as dk  # noqa: E402
from qsparse_infer.kernels import linear as lk  # noqa: E402
from qsparse_infer.model.config import topk_count  # noqa: E402

NQ, NKV, HD, CTX, VOCAB = 20, 5, 128, 256, 128256
DEFAULT_PARTS = "attention,sampling,projections"


def attention(g: torch.Generator) -> None:
    kc = torch.randn(1, NKV, CTX, HD, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(1, NKV, CTX, HD, device="cuda", generator=g).to(torch.bfloat16)
    qkv = torch.randn(1, (NQ + 2 * NKV) * HD, device="cuda", generator=g)
    pos = torch.full((1,), CTX - 1, dtype=torch.int32, device="cuda")
    slot = torch.zeros(1, dtype=torch.int32, device="cuda")
    ws = dk.AttentionWorkspace.create(1, NQ, NKV, HD, CTX, "cuda")
    for _ in range(2):
        dk.attention_decode(qkv, NQ, NKV, HD, kc, vc, pos, slot, None, ws)


def sampling(g: torch.Generator) -> None:
    logits = torch.randn(VOCAB, device="cuda", generator=g)
    seen = torch.zeros(VOCAB, dtype=torch.uint8, device="cuda")
    fparams = torch.tensor([0.0, 1.0, 1.0], device="cuda")  # greedy
    iparams = torch.zeros(1, dtype=torch.int32, device="cuda")
    rng = torch.zeros(2, dtype=torch.int64, device="cuda")
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    token = torch.zeros(1, dtype=torch.int32, device="cuda")
    for _ in range(2):
        dk.sample(logits, seen, fparams, iparams, rng, pos, token)


def projections(g: torch.Generator) -> None:
    for d, segs, glu in ((2560, [6912, 6912], "silu"), (6912, [2560], None)):
        w = random_packed(d, segs, glu, g)
        x = torch.randn(1, d, device="cuda", generator=g)
        nw = torch.rand(d, device="cuda", generator=g) + 0.5
        for _ in range(2):
            lk.ternary_linear(x, w, topk_count(d, 0.6), norm_weight=nw, glu=glu)


def gemv_variants(g: torch.Generator) -> None:
    d = 2560
    w = random_packed(d, [d], None, g)
    x = torch.randn(1, d, device="cuda", generator=g)
    nw = torch.rand(d, device="cuda", generator=g) + 0.5
    for s, variant, shape in ((0.0, "t1", None), (0.6, "t1", None), (0.0, "fused", (4, 1)), (0.6, "fused", (4, 1))):
        for _ in range(2):
            lk.ternary_linear(x, w, topk_count(d, s), norm_weight=nw, _variant=variant, _shape=shape)


PARTS = {"attention": attention, "sampling": sampling, "projections": projections, "gemv-variants": gemv_variants}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated, of {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    for part in args.parts.split(","):
        PARTS[part](g)
    torch.cuda.synchronize()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
