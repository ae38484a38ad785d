"""Where a serving step's time goes when prompts are prefilled (issue 17's TTFT, ITL p99 and long-prompt targets).

`bench/serve.py` shows the HTTP numbers; this measures the GpuBatchRunner steps behind them, on the same random
weights, without HTTP:
- decode-only steps (the CUDA graph) at B decode rows;
- mixed steps: prompt chunks of `--chunk` tokens beside B decode rows (what a burst of arriving prompts costs);
- a long prompt prefilled in chunks beside B decode rows, the step time against the chunk's start position
  (what the 4k-prompt case pays per step).
Each step is timed on the device (CUDA events around launch, result() waited) and on the host (until launch
returns). `--profile` adds torch.profiler's top kernels of one mixed step and one late long-prompt chunk.

  python bench/mixed_step.py --shape 2b4t --json bench/results/mixed-step-h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qsparse_infer.generate.sampling import SamplingSettings
from qsparse_infer.kernels.ceilings import median_seconds
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.random_model import SHAPES, random_engine
from qsparse_infer.serving.gpu_runner import GpuBatchRunner
from qsparse_infer.serving.runner import PrefillChunk, StepPlan


def timed(runner: GpuBatchRunner, plan: StepPlan) -> tuple[float, float]:
    """(device ms, host ms until launch returned) of one step."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    h = runner.launch(plan)
    host = time.perf_counter() - t0
    b.record()
    h.result()
    torch.cuda.synchronize()
    return a.elapsed_time(b), 1e3 * host


class Bench:
    def __init__(self, runner: GpuBatchRunner, seed: int = 0) -> None:
        self.r, self.g = runner, torch.Generator().manual_seed(seed)

    def ids(self, n: int) -> list[int]:
        return torch.randint(100, min(self.r.vocab_size, 32000), (n,), generator=self.g).tolist()

    def ready(self, slots: list[int], prompt: int = 16) -> None:
        for s in slots:
            self.r.begin(s, SamplingSettings(temperature=0.0), 0)
            self.r.prefill(s, self.ids(prompt), True)

    def release(self, slots: list[int]) -> None:
        for s in slots:
            self.r.release(s)


def decode_only(bn: Bench, b: int, reps: int) -> dict[str, Any]:
    slots = list(range(b))
    bn.ready(slots)
    dev, host = zip(*[timed(bn.r, StepPlan(decode=slots)) for _ in range(reps)])
    bn.release(slots)
    return {"decode_rows": b, "device_ms": statistics.median(dev), "host_ms": statistics.median(host)}


def burst(bn: Bench, b: int, chunks: int, chunk: int, reps: int) -> dict[str, Any]:
    """`chunks` whole prompts of `chunk` tokens in one step beside b decode rows (slots b.. are the prompts)."""
    slots = list(range(b))
    bn.ready(slots)
    dev, host = [], []
    for _ in range(reps):
        ps = list(range(b, b + chunks))
        for s in ps:
            bn.r.begin(s, SamplingSettings(temperature=0.0), 0)
        d, h = timed(bn.r, StepPlan(prefills=[PrefillChunk(s, bn.ids(chunk), True) for s in ps], decode=slots))
        dev.append(d)
        host.append(h)
        bn.release(ps)
    bn.release(slots)
    return {"decode_rows": b, "prompts": chunks, "prompt_tokens": chunks * chunk,
            "device_ms": statistics.median(dev), "host_ms": statistics.median(host)}


def long_prompt(bn: Bench, b: int, total: int, chunk: int) -> dict[str, Any]:
    """One `total`-token prompt in chunks of `chunk`, each step beside b decode rows: ms per chunk start."""
    slots = list(range(b))
    bn.ready(slots)
    p = b
    bn.r.begin(p, SamplingSettings(temperature=0.0), 0)
    rows = []
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        d, h = timed(bn.r, StepPlan(prefills=[PrefillChunk(p, bn.ids(n), start + n == total)], decode=slots))
        rows.append({"start": start, "tokens": n, "device_ms": d, "host_ms": h})
    bn.release(slots + [p])
    return {"decode_rows": b, "total": total, "chunk": chunk, "steps": rows,
            "sum_device_ms": sum(r["device_ms"] for r in rows)}


def profile(bn: Bench, label: str, make_plan, top: int = 14) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    plan = make_plan()
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bn.r.launch(plan).result()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    rows = sorted((e for e in ka if e.device_time_total > 0), key=lambda e: -e.self_device_time_total)[:top]
    out = [{"name": e.key[:90], "calls": e.count, "device_us": e.self_device_time_total} for e in rows]
    total = sum(e.self_device_time_total for e in ka)
    print(f"  profile {label}: device total {total / 1e3:.2f} ms, kernels by self device time:", file=sys.stderr)
    for o in out:
        print(f"    {o['device_us'] / 1e3:8.3f} ms  {o['calls']:5d}x  {o['name']}", file=sys.stderr)
    return out


def host_profile(bn: Bench, chunk: int, top: int = 18) -> list[dict[str, Any]]:
    """cProfile of the host side of one mixed step (1 prompt of `chunk` tokens + 12 decode rows): where the
    eager launch's milliseconds go."""
    import cProfile
    import pstats

    bn.ready(list(range(12)))
    bn.r.begin(12, SamplingSettings(temperature=0.0), 0)
    plan = StepPlan(prefills=[PrefillChunk(12, bn.ids(chunk), True)], decode=list(range(12)))
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    h = bn.r.launch(plan)
    prof.disable()
    h.result()
    bn.release(list(range(13)))
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own (tottime) seconds
    out = [{"func": f"{Path(k[0]).name}:{k[1]}:{k[2]}", "calls": v[1], "own_ms": 1e3 * v[2], "cum_ms": 1e3 * v[3]}
           for k, v in rows]
    print(f"  host profile, 1 x {chunk} + 12 decode (total {1e3 * st.total_tt:.2f} ms), by own time:", file=sys.stderr)
    for o in out:
        print(f"    {o['own_ms']:7.3f} ms own {o['cum_ms']:7.3f} cum {o['calls']:6d}x  {o['func']}", file=sys.stderr)
    return out


def gemm_variants(runner: GpuBatchRunner, reps: int) -> list[dict[str, Any]]:
    """One layer's four projections at the mixed steps' row counts, through each GEMM variant."""
    from qsparse_infer.kernels.linear import ternary_linear

    L, k = runner.weights.layers[0], runner.topk
    out = []
    for t in (80, 524):
        row: dict[str, Any] = {"T": t}
        for v in ("skinny", "prefill", "tiled"):
            xs = {n: torch.randn(t, w.in_features, device="cuda") for n, w in
                  (("qkv", L.qkv), ("o", L.o), ("gate_up", L.gate_up), ("down", L.down))}

            def layer() -> None:
                ternary_linear(xs["qkv"], L.qkv, k.attn, _variant=v)
                ternary_linear(xs["o"], L.o, k.o, _variant=v)
                ternary_linear(xs["gate_up"], L.gate_up, k.gate_up, _variant=v)
                ternary_linear(xs["down"], L.down, k.down, _variant=v)
            row[f"{v}_us"] = 1e6 * median_seconds(layer, reps, warmup=1)
        out.append(row)
        print(f"  one layer's projections at T={t}: skinny GEMM {row['skinny_us']:.0f} us, prefill "
              f"{row['prefill_us']:.0f} us, tiled {row['tiled_us']:.0f} us", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2b4t", choices=sorted(SHAPES))
    p.add_argument("--sparsity", default="0")
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--chunk", type=int, default=128, help="prompt length in the burst case")
    p.add_argument("--long", type=int, default=4092, help="the long prompt's tokens")
    p.add_argument("--long-chunks", default="64,512", help="chunk sizes for the long prompt")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    sp = SparsityConfig.parse(a.sparsity)
    ef = random_engine(SHAPES[a.shape], sp, device="cuda", seed=0)
    runner = GpuBatchRunner(ef, sp, max_slots=a.max_slots, max_len=min(4096, a.long + 8))
    bn = Bench(runner)
    card = torch.cuda.get_device_name()
    res: dict[str, Any] = {"card": card, "shape": a.shape, "sparsity": a.sparsity, "decode": [], "burst": [],
                           "long": []}
    for b in (1, 16, 60):
        res["decode"].append(decode_only(bn, b, a.reps))
        d = res["decode"][-1]
        print(f"decode B={b:3d}: device {d['device_ms']:.3f} ms, host {d['host_ms']:.3f} ms", file=sys.stderr)
    for b, k in ((0, 1), (0, 4), (12, 1), (12, 4), (60, 4)):
        res["burst"].append(burst(bn, b, k, a.chunk, a.reps))
        d = res["burst"][-1]
        print(f"mixed {k} x {a.chunk} prompt tokens + {b} decode rows: device {d['device_ms']:.2f} ms "
              f"({1e3 * d['device_ms'] / d['prompt_tokens']:.1f} us/prompt token), host {d['host_ms']:.2f} ms",
              file=sys.stderr)
    for c in (int(x) for x in a.long_chunks.split(",")):
        for b in (16,):
            lp = long_prompt(bn, b, a.long, c)
            res["long"].append(lp)
            st = lp["steps"]
            pick = [st[0], st[len(st) // 4], st[len(st) // 2], st[3 * len(st) // 4], st[-1]]
            print(f"long {a.long} in chunks of {c} + {b} decode rows: {len(st)} steps, {lp['sum_device_ms']:.0f} ms "
                  "on the device; per step at start " + ", ".join(f"{r['start']}: {r['device_ms']:.2f} ms (host "
                                                                 f"{r['host_ms']:.2f})" for r in pick),
                  file=sys.stderr)
    if a.profile:
        def mixed_plan() -> StepPlan:
            bn.ready(list(range(12)))
            for s in range(12, 16):
                runner.begin(s, SamplingSettings(temperature=0.0), 0)
            return StepPlan(prefills=[PrefillChunk(s, bn.ids(a.chunk), True) for s in range(12, 16)],
                            decode=list(range(12)))
        res["profile_mixed"] = profile(bn, f"4 x {a.chunk} + 12 decode", mixed_plan)
        bn.release(list(range(16)))

        def late_plan() -> StepPlan:
            bn.ready(list(range(16)))
            runner.begin(16, SamplingSettings(temperature=0.0), 0)
            for _ in range(0, 3072, 512):
                runner.launch(StepPlan(prefills=[PrefillChunk(16, bn.ids(512), False)])).result()
            return StepPlan(prefills=[PrefillChunk(16, bn.ids(64), False)], decode=list(range(16)))
        res["profile_late_chunk"] = profile(bn, "64 tokens at 3072 + 16 decode", late_plan)
        bn.release(list(range(17)))
    if a.profile:
        res["host_profile"] = host_profile(bn, a.chunk)
        res["gemm_variants"] = gemm_variants(runner, a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
