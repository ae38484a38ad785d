"""Batched ternary_linear paths at BitNet-2B4T shapes: which path serves B decode rows fastest.

For B in 1..64 rows, sparsity S in (0, 0.6) and each projection group of a 2B4T layer (qkv, o, gate_up with
the GLU epilogue, down with the residual epilogue; the RMSNorm fused as in the decoder), times
linear_kernels.ternary_linear with each forced path:
  t1    the one-token kernel once per row (B launches)
  gemv  the gather-GEMV, variant 1, in groups of <= 8 rows (each row reads only its K selected rows)
  gemm  the int8 tensor-core GEMM on masked activations (reads every weight row once for all rows; the
        skinny variant 2 up to 64 rows)
  tiled GEMM variant 1 (64-token tiles), the batched path before variant 2 existed
Each measurement is a CUDA graph of `--calls` back-to-back calls (the decoder replays graphs, so launch
overhead is not counted), replayed `--reps` times; the median per call is printed in us.

Prints one table per S (us per call per group, and the per-layer sum), then the crossover: the fastest path
per B and the serving.gpu_runner.LinearPolicy that follows from it. --json writes every number.

    python bench/batched_linear.py [--json bench/results/batched-linear-h200.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import time_graph, write_json  # noqa: E402  (median of CUDA-graph replays, warm-up outside the capture)

from qsparse_infer.model.config import ModelConfig, topk_count  # noqa: E402
from qsparse_infer.model.format import group_geometry  # noqa: E402
from qsparse_infer.kernels.linear import PackedTernary, pack_ternary_gpu, ternary_linear  # noqa: E402
from qsparse_infer.model.random_model import SHAPES  # noqa: E402

CFG_2B4T = SHAPES["2b4t"]
GROUPS = ("qkv", "o", "gate_up", "down")
PATHS = ("t1", "gemv", "gemm", "tiled")
PATH_ARGS = {"t1": {"_path": "t1"}, "gemv": {"_path": "gemv"}, "gemm": {"_path": "gemm"},
             "tiled": {"_variant": "tiled"}}


def make_group(cfg: ModelConfig, group: str, gen: torch.Generator) -> PackedTernary:
    d, segs, layout = group_geometry(cfg, group)
    segments = [(torch.randint(0, 3, (n, d), generator=gen, dtype=torch.int8) - 1).cuda() for n in segs]
    packed = pack_ternary_gpu(segments, layout)
    scales = torch.rand(len(segs), generator=gen).add_(0.5).cuda()
    return PackedTernary(packed, scales, segs, layout)


def time_path(x: torch.Tensor, w: PackedTernary, k: int, kw: dict, path: str, calls: int, reps: int) -> float:
    """Median microseconds per ternary_linear call on one path (the kernel lab's graph timer)."""
    return time_graph([lambda: ternary_linear(x, w, k, **PATH_ARGS[path], **kw)] * calls, replays=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--sparsity", default="0,0.6")
    ap.add_argument("--paths", default=",".join(PATHS), help="any of " + ", ".join(PATHS))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [float(s) for s in args.sparsity.split(",")]
    paths = args.paths.split(",")
    cfg = CFG_2B4T
    gen = torch.Generator().manual_seed(0)
    weights = {g: make_group(cfg, g, gen) for g in GROUPS}
    results: list[dict] = []
    print(f"device: {torch.cuda.get_device_name()}; 2B4T shapes; us per call (median of {args.reps} graph replays "
          f"of {args.calls} calls)")
    for s in sparsities:
        table: dict[tuple[int, str], dict[str, float]] = {}
        for b in batches:
            for path in paths:
                row: dict[str, float] = {}
                for g in GROUPS:
                    w = weights[g]
                    d = w.in_features
                    k = max(1, topk_count(d, s))
                    x = torch.randn(b, d, generator=gen).cuda()
                    kw: dict = {"norm_weight": torch.rand(d, generator=gen).add_(0.5).cuda()}
                    if g == "gate_up":
                        kw["glu"] = "relu2"
                    if g in ("o", "down"):
                        kw["residual"] = torch.randn(b, w.out_features, generator=gen).cuda()
                    us = time_path(x, w, k, kw, path, args.calls, args.reps)
                    row[g] = us
                    results.append({"S": s, "B": b, "path": path, "group": g, "us": us})
                row["layer"] = sum(row[g] for g in GROUPS)
                table[(b, path)] = row
                del x
        print(f"\nS = {s}")
        print(f"{'B':>4} {'path':>5} " + " ".join(f"{g:>9}" for g in GROUPS) + f" {'layer':>9} {'x30 ms':>7}"
              f" {'us/row':>7}")
        for b in batches:
            for path in paths:
                r = table[(b, path)]
                print(f"{b:>4} {path:>5} " + " ".join(f"{r[g]:9.1f}" for g in GROUPS)
                      + f" {r['layer']:9.1f} {30 * r['layer'] / 1e3:7.2f} {r['layer'] / b:7.1f}")
        print("crossover (fastest path per B, per layer):")
        best = {}
        for b in batches:
            p = min(paths, key=lambda q: table[(b, q)]["layer"])
            best[b] = p
            others = ", ".join(f"{q} {table[(b, q)]['layer']:.1f}" for q in paths if q != p)
            print(f"  B = {b:>3}: {p} ({table[(b, p)]['layer']:.1f} us; {others})")
        gemv_max = max([b for b in batches if best[b] in ("t1", "gemv")] or [1])
        gemm_min = min([b for b in batches if best[b] in ("gemm", "tiled")] or [0])
        if gemm_min and gemm_min < gemv_max:
            print(f"  (not one crossover: the GEMM already wins at B = {gemm_min})")
        print(f"  => LinearPolicy(gemv_max_rows={gemv_max}, t1_single_row={best.get(1, 't1') == 't1'})  (S = {s})")
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "results": results})


if __name__ == "__main__":
    main()
