"""Decoder diagnostics on the GPU (lab tool, not a test):
1. ternary_linear against the reference BitLinear for the combinations the decoder uses (T = 1 / 7 / 12,
   dense / sparse, fused norm or not, each epilogue): relative error per combination.
2. Where the time of one 2B4T decode step goes: qsparse_infer.bench.profile (as `qsparse bench --profile`).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from qsparse_infer.model import quant
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.kernels.linear import PackedTernary, ternary_linear
from qsparse_infer.model.reference import RMSNorm, glu


def linear_check() -> None:
    g = torch.Generator().manual_seed(0)
    d, m = 320, 208
    for layout, epi in (("concat", "plain"), ("concat", "residual"), ("interleave", "silu"), ("interleave", "relu2")):
        segs = [m, m] if layout == "interleave" else [m]
        tern = [torch.randint(-1, 2, (n, d), generator=g, dtype=torch.int8) for n in segs]
        betas = [0.5 + torch.rand((), generator=g).item() for _ in segs]
        w = PackedTernary.from_ternary(tern, betas, layout)
        for t in (1, 7, 12):
            for k in (d, d // 2):
                for with_norm in (False, True):
                    x = torch.randn(t, d, generator=g) * 2
                    nw = 1 + 0.2 * torch.randn(d, generator=g)
                    xin = x
                    if with_norm:
                        rn = RMSNorm(d, 1e-5)
                        rn.weight.data.copy_(nw)
                        xin = rn(x)
                    ys = [quant.bitlinear(xin, tt, b, k) for tt, b in zip(tern, betas)]
                    res = torch.randn(t, m, generator=g)
                    kw = dict(norm_weight=nw.cuda() if with_norm else None, norm_eps=1e-5)
                    if epi == "plain":
                        ref, got = ys[0], ternary_linear(x.cuda(), w, k, **kw)
                    elif epi == "residual":
                        r = res.cuda().clone()
                        ref, got = res + ys[0], ternary_linear(x.cuda(), w, k, residual=r, out=r, **kw)
                    else:
                        ref, got = glu(ys[0], ys[1], epi), ternary_linear(x.cuda(), w, k, glu=epi, **kw)
                    err = float((got.cpu().double() - ref.double()).norm() / ref.double().norm())
                    flag = "" if err < 1e-4 else "   <-- MISMATCH"
                    print(f"linear {epi:8s} T={t:2d} k={'D' if k == d else 'D/2'} norm={int(with_norm)}: "
                          f"rel err {err:.2e}{flag}", flush=True)


def profile_step(sparsity: float, steps: int = 5) -> None:
    """The per-kind table of qsparse_infer.bench.profile (the same as `qsparse bench --profile`), then the graph
    replay time of the same step for comparison."""
    from qsparse_infer.kernels.ceilings import streaming_gbps
    from qsparse_infer.gpu.model import GpuModel
    from qsparse_infer.bench.profile import profile_decode, table
    from qsparse_infer.model.random_model import SHAPES, random_engine
    from qsparse_infer.generate.sampling import SamplingSettings

    cfg = SHAPES["2b4t"]
    ef = random_engine(cfg, device="cuda", seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(1))
    sp = SparsityConfig.uniform(sparsity)
    ceiling = streaming_gbps()["streaming_gbps"]
    print(f"\n2b4t S={sparsity:g}")
    print(table(profile_decode(ef, sp, prompt, ceiling, steps=steps)))
    model = GpuModel(ef, sp, max_len=512)
    model.prefill(prompt, SamplingSettings(temperature=0))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(41)]
    ev[0].record()
    for i in range(40):
        model._run_step()
        ev[i + 1].record()
    torch.cuda.synchronize()
    print(f"  graph replay: median {statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(40)) * 1e3:.0f} us"
          " per step")
    del model, ef
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", default="0,0.6")
    a = p.parse_args()
    linear_check()
    for s in a.sparsity.split(","):
        profile_step(float(s))


if __name__ == "__main__":
    main()
