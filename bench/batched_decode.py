"""Batched decode step of GpuBatchRunner on a random model of a real shape (default BitNet-2B4T), against the
torch bf16 static-batch peer: ms per step and tokens/s for each batch size B and sparsity S.

Each B: B slots, random prompts of --prompt tokens (prefilled one slot at a time), then --steps greedy
decode steps of all B slots; a step is timed on the host around runner.decode (graph replay + the token
read-back: what the server pays per step). Prints one line per (S, B) and, with --torch, the peer's line.

    python bench/batched_decode.py [--batches 1,16,64] [--sparsity 0,0.6] [--torch] [--no-t1] [--profile] [--json PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import write_json  # noqa: E402  (the kernel lab's atomic result writer)

from qsparse_infer.model.config import SparsityConfig  # noqa: E402
from qsparse_infer.model.random_model import SHAPES, random_engine  # noqa: E402
from qsparse_infer.generate.sampling import SamplingSettings  # noqa: E402
from qsparse_infer.serving.gpu_runner import GpuBatchRunner, LinearPolicy  # noqa: E402


def bench_runner(runner: GpuBatchRunner, b: int, prompt: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(b)
    slots = list(range(b))
    for s in slots:
        runner.begin(s, SamplingSettings(temperature=0.0), 0)
        runner.prefill(s, torch.randint(0, runner.vocab_size, (prompt,), generator=g).tolist(), last=True)
    for _ in range(3):
        runner.decode(slots)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.decode(slots)
        times.append(time.perf_counter() - t0)
    for s in slots:
        runner.release(s)
    ms = 1e3 * statistics.median(times)
    return {"B": b, "ms_per_step": ms, "tok_s": b * 1e3 / ms}


@torch.no_grad()
def profile_runner(runner: GpuBatchRunner, b: int, prompt: int, steps: int = 5) -> dict[str, float]:
    """us per decode step by kernel (torch.profiler over eager steps, PDL off so that no kernel's time includes
    its wait for the previous one); the eager launch gaps are not in these times."""
    from torch.profiler import ProfilerActivity, profile

    from qsparse_infer.kernels._ext import ext
    from qsparse_infer.bench.profile import _trace_kernels, base_name

    g = torch.Generator().manual_seed(b)
    slots = list(range(b))
    for s in slots:
        runner.begin(s, SamplingSettings(temperature=0.0), 0)
        runner.prefill(s, torch.randint(0, runner.vocab_size, (prompt,), generator=g).tolist(), last=True)
    graphs, runner.use_graph = runner.use_graph, False
    pdl = ext().get_pdl()
    ext().set_pdl(False)
    try:
        for _ in range(2):
            runner.decode(slots)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.decode(slots)
    finally:
        ext().set_pdl(pdl)
        runner.use_graph = graphs
        for s in slots:
            runner.release(s)
    per: dict[str, float] = {}
    for _, dur, name in _trace_kernels(prof):
        per[base_name(name)] = per.get(base_name(name), 0.0) + dur / steps
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b4t")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--sparsity", default="0,0.6")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gemv-max-rows", type=int, default=LinearPolicy.gemv_max_rows)
    ap.add_argument("--no-t1", action="store_true", help="variant 1 instead of the one-token kernel at B = 1")
    ap.add_argument("--torch", action="store_true", help="also the torch bf16 static-batch peer")
    ap.add_argument("--profile", action="store_true", help="also the time per kernel of one step (eager)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = SHAPES[args.shape]
    out: list[dict] = []
    max_len = args.prompt + args.steps + 8
    ef = random_engine(cfg, device="cuda", seed=0)
    policy = LinearPolicy(gemv_max_rows=args.gemv_max_rows, t1_single_row=not args.no_t1)
    print(f"{torch.cuda.get_device_name()}; {args.shape}; prompt {args.prompt}, {args.steps} steps; {policy}")
    for s in (float(x) for x in args.sparsity.split(",")):
        sp = SparsityConfig(attn=s, o=s, mlp=s, down=s)
        runner = GpuBatchRunner(ef, sp, max_slots=max(batches), max_len=max_len, policy=policy)
        for b in batches:
            r = bench_runner(runner, b, args.prompt, args.steps) | {"S": s, "who": "qsparse"}
            print(f"  qsparse S={s:<4} B={b:>3}: {r['ms_per_step']:7.3f} ms/step {r['tok_s']:9.0f} tok/s")
            if args.profile:
                r["kernel_us_per_step"] = prof = profile_runner(runner, b, args.prompt)
                print(f"    kernels (eager, PDL off): {sum(prof.values()):.0f} us per step; "
                      + ", ".join(f"{k} {v:.0f}" for k, v in list(prof.items())[:8]))
            out.append(r)
        del runner
        torch.cuda.empty_cache()
    if args.torch:
        from qsparse_infer.bench.torch_peer import bench_torch_batched

        for b in batches:
            r = bench_torch_batched(cfg, b, prompt_len=args.prompt, new_tokens=args.steps) | {"who": "torch"}
            print(f"  torch bf16   B={b:>3}: {r['ms_per_step']:7.3f} ms/step {r['tok_s']:9.0f} tok/s "
                  f"({r['mode']}, peak {r['peak_mem'] / 2**30:.1f} GiB)")
            out.append(r)
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "results": out})


if __name__ == "__main__":
    main()
