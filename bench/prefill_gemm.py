"""Kernel lab: the ternary GEMM variants at prefill widths, beside cuBLAS's int8 GEMM (torch._int_mm).

For each projection group of a BitNet-2B4T layer and T tokens, times the GEMM alone on masked int8
activations (the select kernel's qdense output), as a CUDA graph of `--calls` back-to-back calls:
  skinny     variant 2 (16 tokens per CTA, k split over a cluster; its planned split count)
  prefill64  variant 3 with 64-token tiles
  prefill128 variant 3 with 128-token tiles
  int_mm     torch._int_mm on the unpacked int8 weights [D, N]: cuBLAS's int8 tensor-core GEMM, the peer
             (it reads 4x the weight bytes, and is no ternary kernel: a yardstick for the mma rate)
the select kernel alone (quantize_topk with the masked dense output the GEMM reads) at its CTA size for T and
forced to 1024 threads (its size below 256 tokens), and the whole default ternary_linear call (select + the
planned GEMM + epilogue) as the runner pays it.
Prints us and int8 TOPS (2 T D Npad / time) per group and the per-layer sum; --json writes every number.

    python bench/prefill_gemm.py [--tokens 64,128,256,512,1024,2048] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import time_graph, write_json  # noqa: E402
from batched_linear import CFG_2B4T, GROUPS, make_group  # noqa: E402

from qsparse_infer.kernels._ext import ext  # noqa: E402
from qsparse_infer.kernels.linear import EPI_PLAIN, plan_gemm, ternary_linear  # noqa: E402
from qsparse_infer.model.config import topk_count  # noqa: E402

VARIANTS = ("skinny", "prefill64", "prefill128", "int_mm")


def gemm_call(variant: str, qd: torch.Tensor, ldq: int, gamma: torch.Tensor, out: torch.Tensor, w, t: int):
    """One GEMM launch on the current stream (no selection): the lab's unit of time."""
    d = w.in_features
    if variant == "skinny":
        v, param, tile = 2, plan_gemm(w, t, qd.device, "skinny")[1], 128
    else:
        v, param, tile = 3, 1, int(variant.removeprefix("prefill"))

    def call() -> None:
        ext().ternary_gemm(qd.data_ptr(), ldq, gamma.data_ptr(), t, d, w.packed.data_ptr(), int(w.packed.shape[1]),
                           w.colinfo.data_ptr(), w.scales.data_ptr(), EPI_PLAIN, 0, out.data_ptr(), w.out_features, 0,
                           torch.cuda.current_stream().cuda_stream, v, param, tile)
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="64,128,256,512,1024,2048")
    ap.add_argument("--sparsity", type=float, default=0.6, help="for the whole-call timing (the GEMM is dense)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    weights = {g: make_group(CFG_2B4T, g, gen) for g in GROUPS}
    dense = {g: None for g in GROUPS}
    results: list[dict] = []
    print(f"device: {torch.cuda.get_device_name()}; 2B4T groups; us per call (median of {args.reps} graph replays "
          f"of {args.calls} calls), int8 TOPS = 2 T D Npad / time")
    for t in (int(v) for v in args.tokens.split(",")):
        layer = {v: 0.0 for v in VARIANTS + ("select", "select1024", "call")}
        for g in GROUPS:
            w = weights[g]
            d, npad = w.in_features, w.npad
            ldq = -(-d // 64) * 64
            qd = torch.zeros(t, ldq, dtype=torch.int8, device="cuda")
            qd[:, :d] = torch.randint(-127, 128, (t, d), generator=gen, dtype=torch.int8).cuda()
            gamma = torch.rand(t, generator=gen).add_(0.5).cuda()
            out = torch.empty(t, w.out_features, device="cuda")
            row: dict = {"T": t, "group": g}
            for v in VARIANTS:
                if v == "int_mm":
                    if dense[g] is None:
                        dense[g] = torch.randint(-1, 2, (d, npad), generator=gen, dtype=torch.int8).cuda()
                    a = qd[:, :d].contiguous()
                    try:
                        us = time_graph([lambda: torch._int_mm(a, dense[g])] * args.calls, replays=args.reps)
                    except RuntimeError as e:  # shape limits of cuBLASLt's int8 path
                        print(f"  int_mm T={t} {g}: {str(e).splitlines()[0]}")
                        us = float("nan")
                else:
                    us = time_graph([gemm_call(v, qd, ldq, gamma, out, w, t)] * args.calls, replays=args.reps)
                row[f"{v}_us"] = us
                row[f"{v}_tops"] = 2 * t * d * npad / us / 1e6
                layer[v] += us
            x = torch.randn(t, d, generator=gen).cuda()
            k = max(1, topk_count(d, args.sparsity))
            idx = torch.empty(t, k, dtype=torch.int32, device="cuda")
            qs = torch.empty(t, k, dtype=torch.int8, device="cuda")
            for name, threads in (("select", 0), ("select1024", 1024)):
                def select(threads: int = threads) -> None:
                    ext().quantize_topk(x.data_ptr(), 0, 0, 1e-5, t, d, k, idx.data_ptr(), qs.data_ptr(), k,
                                        gamma.data_ptr(), qd.data_ptr(), ldq, torch.cuda.current_stream().cuda_stream,
                                        threads)
                row[f"{name}_us"] = time_graph([select] * args.calls, replays=args.reps)
                layer[name] += row[f"{name}_us"]
            row["call_us"] = time_graph([lambda: ternary_linear(x, w, k)] * args.calls, replays=args.reps)
            row["call_variant"] = plan_gemm(w, t, x.device)
            layer["call"] += row["call_us"]
            results.append(row)
            print(f"T={t:5d} {g:>8}: " + "  ".join(f"{v} {row[f'{v}_us']:8.1f} us ({row[f'{v}_tops']:5.0f})"
                                                   for v in VARIANTS)
                  + f"  | select {row['select_us']:6.1f} (1024 thr {row['select1024_us']:6.1f}) us"
                  + f"  | ternary_linear {row['call_us']:8.1f} us (variant, param {row['call_variant']})")
        results.append({"T": t, "group": "layer", **{f"{v}_us": layer[v] for v in layer}})
        print(f"T={t:5d}    layer: " + "  ".join(f"{v} {layer[v]:8.1f} us" for v in VARIANTS)
              + f"  | select {layer['select']:6.1f} (1024 thr {layer['select1024']:6.1f}) us"
              + f"  | ternary_linear {layer['call']:8.1f} us = {layer['call'] / t:.2f} us/token, x30 layers "
                f"{30 * layer['call'] / t:.1f} us/token")
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "results": results})


if __name__ == "__main__":
    main()
