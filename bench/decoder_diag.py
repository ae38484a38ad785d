"""Decoder diagnostics on the GPU (lab tool, not a test):
1. ternary_linear against the reference BitLinear for the combinations the decoder uses (T = 1 / 7 / 12,
   dense / sparse, fused norm or not, each epilogue): relative error per combination.
2. Where the time of one 2B4T decode step goes: torch.profiler over eager steps, per kernel, per step.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from qsparse_infer import quant
from qsparse_infer.config import SparsityConfig
from qsparse_infer.linear_kernels import PackedTernary, ternary_linear
from qsparse_infer.reference import RMSNorm, glu


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
    from qsparse_infer.gpu_model import GpuModel
    from qsparse_infer.random_model import SHAPES, random_engine
    from qsparse_infer.sampling import SamplingSettings

    cfg = SHAPES["2b4t"]
    ef = random_engine(cfg, device="cuda", seed=0)
    model = GpuModel(ef, SparsityConfig.uniform(sparsity), max_len=512)
    prompt = torch.randint(0, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(1))
    model.set_graph(False)
    model.prefill(prompt, SamplingSettings(temperature=0))
    for _ in range(3):
        model._run_step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model._run_step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps, e.count // steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\n2b4t S={sparsity:g}: eager decode step, GPU kernel time {total:.0f} us per step (sum over kernels)")
    for us, n, name in rows[:14]:
        print(f"  {us:8.1f} us  {n:4d}x  {us / max(n, 1):7.2f} us/call  {name[:90]}")
    # graph replay time for comparison
    model.set_graph(True)
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
