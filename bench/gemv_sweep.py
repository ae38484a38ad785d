"""Launch-shape sweep of the gather-GEMV (kernel lab): for each decode shape and sparsity, time every
(variant, chunks per tile, K-splits) and print the table, plus two floors measured in
the same run: an empty kernel in a CUDA graph (the launch floor) and the streaming ceiling (ceilings.py).

    python bench/gemv_sweep.py [--json FILE] [--only 2b4t]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import n_sets, random_packed, streaming_ceiling, time_graph  # noqa: E402

from qsparse_infer.kernels import linear as lk  # noqa: E402
from qsparse_infer.atomic_io import write_json  # noqa: E402
from qsparse_infer.model import quant  # noqa: E402
from qsparse_infer.model.config import topk_count  # noqa: E402

SHAPES = [  # (name, D, segments, glu, fused norm)
    ("2b4t.qkv", 2560, [2560, 640, 640], None, True),
    ("2b4t.o", 2560, [2560], None, True),
    ("2b4t.gate_up", 2560, [6912, 6912], "relu2", True),
    ("2b4t.down", 6912, [2560], None, True),
    ("8b.gate_up", 4096, [14336, 14336], "relu2", True),
    ("70b.gate_up", 8192, [28672, 28672], "relu2", False),
    ("70b.down", 28672, [8192], None, False),
]


def empty_kernel_us() -> float:
    """Per-kernel time of a graph of tiny dependent kernels: what any launch costs at minimum."""
    x = torch.zeros(1, device="cuda")
    return time_graph([lambda: x.add_(1.0)] * 50)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--variants", default="t1p,t1,fused,split", help="comma-separated subset of t1p,t1,fused,split")
    args = ap.parse_args()
    ceiling = streaming_ceiling()["streaming_gbps"]
    floor = empty_kernel_us()
    print(f"device {torch.cuda.get_device_name()}  streaming ceiling {ceiling:.0f} GB/s  empty-kernel floor "
          f"{floor:.2f} us")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, d, segs, glu, with_norm in SHAPES:
        if args.only and args.only not in name:
            continue
        layout = "interleave" if glu else "concat"
        rb = quant.packed_columns(segs, layout) // 4
        ws = [random_packed(d, segs, glu, gen) for _ in range(n_sets(d * rb))]
        x = torch.randn(1, d, device="cuda", generator=gen) * (0.2 + 3 * torch.rand(d, device="cuda", generator=gen))
        nw = torch.rand(d, device="cuda", generator=gen) + 0.5 if with_norm else None
        out = torch.empty(1, segs[0] if glu else sum(segs), device="cuda")
        for s in (0.0, 0.6):
            k = topk_count(d, s)
            auto = lk.plan_gemv(ws[0], k, x.device)  # variant 1's own plan, swept around
            nbytes = k * rb
            floor_us = nbytes / (ceiling * 1e9) * 1e6
            best = None
            for variant in args.variants.split(","):
                # for t1/t1p, `chunks` is the CTA size (0 = the default for D)
                one_token = variant in ("t1", "t1p")
                for chunks in (((0, 512) if d <= 7168 else (0,)) if one_token else (1, 2, 4, 8)):
                    for splits in ((1, 2, 4, 8, 16) if one_token else sorted({1, 2, 4, auto.splits})):
                        try:
                            us = time_graph([lambda w=w: lk.ternary_linear(
                                x, w, k, norm_weight=nw, glu=glu, out=out, _variant=variant,
                                _shape=(chunks, splits)) for w in ws], replays=15)
                        except ValueError as e:
                            print(f"  skip {variant} c={chunks} s={splits}: {e}")
                            continue
                        row = dict(shape=name, D=d, N=sum(segs), sparsity=s, k=k, variant=variant, chunks=chunks,
                                   splits=splits, us=round(us, 3), bytes=nbytes, bw_floor_us=round(floor_us, 3),
                                   auto=(one_token and chunks == (0 if lk.t1_threads(d) == 256 else lk.t1_threads(d))
                                         and splits == lk.plan_t1(ws[0], k, x.device)
                                         and variant == ("t1p" if k >= d and lk._t1_variant(d, splits, lk.t1_threads(d)) == 3
                                                         else "t1")))
                        rows.append(row)
                        if best is None or us < best["us"]:
                            best = row
            auto_rows = [r for r in rows if r["shape"] == name and r["sparsity"] == s and r["auto"]]
            print(f"{name:<13} S={s:.1f} k={k:5d} floor(bytes)={floor_us:6.2f} us  auto="
                  f"{auto_rows[0]['us'] if auto_rows else float('nan'):7.2f} us  best={best['us']:7.2f} us "
                  f"[{best['variant']} c={best['chunks']} s={best['splits']}]", flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "streaming_gbps": ceiling,
                               "empty_kernel_us": floor, "rows": rows}, newline=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
