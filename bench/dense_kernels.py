"""Kernel benchmark of the bf16 top-K gather-GEMV (issue 18; csrc/dense/gemv_bf16.cu) at Llama-3-8B and 70B shapes.

One token per call, sparsity 0 / 0.4 / 0.5 / 0.6 on the projection's input, random bf16 weights and inputs.
Timing as bench/kernels.py: a CUDA graph calls the op once per weight set, the sets rotated until they exceed L2
(256 MiB per pass), CUDA events around replays, medians. Peers in the same run: cuBLAS dense bf16 (torch.mm of
the bf16 input, every row: the S = 0 baseline the sparse kernel must beat) and the streaming ceiling
(kernels/ceilings.py). "% of streaming" = (weight bytes the call must read / time) / ceiling.

--teal DIR: TEAL's sparse GEMV (FasterDecoding/TEAL, kernels/sparse_gemv.py, Triton) loaded from DIR at run time, never
vendored; `tools/fetch_teal.sh` puts it in .teal/ for the device call. Same shapes, same S, same L2-defeating
rotation, fp16 weights (its kernel's dtype) in its column-major layout, and the threshold that keeps exactly k
inputs computed beforehand (TEAL calibrates thresholds offline; our kernel selects the top-K inside itself, so
this hands TEAL the easier job). Its GLU shapes run as one GEMV over gate + up (TEAL sparsifies both inputs alike).

--crossover: for T = 1..16 tokens, T one-token kernel calls against one torch bf16 GEMM (the batched path of
kernels/dense.py), at S = 0.5: where the GEMM starts to win.

    python bench/dense_kernels.py [--out DIR] [--quick] [--crossover] [--teal DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import card_name, time_graph, write_json  # noqa: E402  (bench/kernels.py: the shared timing)

from qsparse_infer.kernels import dense as dn  # noqa: E402
from qsparse_infer.kernels.ceilings import streaming_gbps  # noqa: E402
from qsparse_infer.model.config import topk_count  # noqa: E402

SHAPES = [  # (name, D, segments, glu, norm)
    ("8b.qkv", 4096, [4096, 1024, 1024], None, True),
    ("8b.o", 4096, [4096], None, False),
    ("8b.gate_up", 4096, [14336, 14336], "silu", True),
    ("8b.down", 14336, [4096], None, False),
    ("70b.qkv", 8192, [8192, 1024, 1024], None, True),
    ("70b.o", 8192, [8192], None, False),
    ("70b.gate_up", 8192, [28672, 28672], "silu", True),
    ("70b.down", 28672, [8192], None, False),
]
SPARSITIES = [0.0, 0.4, 0.5, 0.6]
L2_DEFEAT_BYTES = 256 << 20


def weight_sets(d: int, n: int, count: int) -> list[dn.DenseWeight]:
    g = torch.Generator(device="cuda").manual_seed(d + n)
    return [dn.DenseWeight((torch.randn(d, n, generator=g, device="cuda") / d ** 0.5).to(torch.bfloat16), (n,))
            for _ in range(count)]


def load_teal(folder: str):
    """TEAL's splitk_sparse_gemv from its checkout (kernels/sparse_gemv.py or sparse_gemv.py in DIR)."""
    base = Path(folder)
    path = next((p for p in (base / "kernels" / "sparse_gemv.py", base / "sparse_gemv.py") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--teal {folder}: no sparse_gemv.py there (tools/fetch_teal.sh fetches it)")
    try:
        import msgspec  # noqa: F401  (TEAL's torch.compile wrappers need it; its kernel does not)
    except ImportError:  # a placeholder base class, so that the module loads; only the kernel is called
        import types
        sys.modules.setdefault("compile_wrapper", types.SimpleNamespace(BaseKernel=object))
    spec = importlib.util.spec_from_file_location("teal_sparse_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.splitk_sparse_gemv


def teal_us(teal, ws: list[dn.DenseWeight], x: torch.Tensor, k: int, s: float) -> float:
    """TEAL's kernel on fp16 copies of the same weight sets ([N, D] views of [D, N] rows: its column-major
    layout), threshold between the k-th and (k+1)-th largest |x| so exactly k inputs pass."""
    mags = x.abs().flatten().sort(descending=True).values
    threshold = float(mags[k - 1] + mags[k]) / 2 if k < mags.numel() else -1.0
    x16 = x.to(torch.float16).view(1, 1, -1)
    w16 = [w.weight_t.to(torch.float16).t() for w in ws]
    sbin = int(round(s * 100))
    for w in w16:  # autotune outside the graph (it launches every config)
        teal(x16, w, threshold, sbin)
    torch.cuda.synchronize()
    us = time_graph([lambda w=w: teal(x16, w, threshold, sbin) for w in w16])
    del w16
    return us


def bench_shape(name: str, d: int, segs: list[int], glu: str | None, norm: bool, ceiling: float,
                sparsities: list[float], teal=None) -> list[dict]:
    n = sum(segs)
    sets = max(1, -(-L2_DEFEAT_BYTES // (d * n * 2)))
    ws = weight_sets(d, n, sets)
    for w in ws:
        w.segment_sizes = tuple(segs) if glu else (n,)
    x = torch.randn(1, d, device="cuda")
    nw = torch.ones(d, device="cuda") if norm else None
    n_out = segs[0] if glu else n
    out = torch.empty(1, n_out, device="cuda")
    rows = []
    xb = x.to(torch.bfloat16)
    cublas_us = time_graph([lambda w=w: torch.mm(xb, w.weight_t) for w in ws])
    for s in sparsities:
        k = topk_count(d, s)
        us = time_graph([lambda w=w: dn.dense_linear(x, w, k, norm_weight=nw, glu=glu, out=out, _path="kernel")
                         for w in ws])
        nbytes = k * n * 2
        gbps = nbytes / us / 1e3
        rows.append({"shape": name, "D": d, "N": n, "S": s, "k": k, "us": us, "bytes": nbytes, "gbps": gbps,
                     "pct_of_streaming": 100 * gbps / ceiling, "cublas_dense_us": cublas_us,
                     "vs_cublas_dense": cublas_us / us, "splits": dn.plan_splits(d, n_out, k, 2 if glu else 1,
                                                                               x.device)})
        teal_note = ""
        if teal is not None and s > 0:
            t_us = teal_us(teal, ws, x, k, s)
            rows[-1].update(teal_us=t_us, vs_teal=t_us / us, teal_pct_of_streaming=100 * nbytes / t_us / 1e3 / ceiling)
            teal_note = f"   TEAL {t_us:8.1f} us ({t_us / us:.2f}x)"
        print(f"{name:12s} S={s:<4g} k={k:<6d} {us:8.1f} us  {gbps:6.0f} GB/s  {rows[-1]['pct_of_streaming']:5.1f}% "
              f"of streaming   cuBLAS dense {cublas_us:8.1f} us ({cublas_us / us:.2f}x){teal_note}", flush=True)
    del ws
    torch.cuda.empty_cache()
    return rows


def crossover(d: int, n: int, s: float) -> list[dict]:
    """T one-token kernel calls vs one bf16 GEMM of T rows (the batched path), one weight set (L2-defeating
    rotation as above)."""
    sets = max(1, -(-L2_DEFEAT_BYTES // (d * n * 2)))
    ws = weight_sets(d, n, sets)
    k = topk_count(d, s)
    out = []
    for t in (1, 2, 3, 4, 8, 16):
        x = torch.randn(t, d, device="cuda")
        rows = [x[i:i + 1] for i in range(t)]
        kern = time_graph([lambda w=w: [dn.dense_linear(r, w, k, _path="kernel") for r in rows] for w in ws])
        gemm = time_graph([lambda w=w: dn.dense_linear(x, w, k, _path="torch") for w in ws])
        out.append({"T": t, "S": s, "kernel_rows_us": kern, "torch_gemm_us": gemm})
        print(f"crossover D={d} N={n} S={s:g} T={t:2d}: {t} kernel calls {kern:8.1f} us, bf16 GEMM {gemm:8.1f} us "
              f"-> {'kernel' if kern < gemm else 'GEMM'}", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"# bf16 top-K gather-GEMV, one token ({res['card']})", "",
             f"Streaming ceiling in the same run: {res['streaming_gbps']:.0f} GB/s. Bytes = the k selected rows x N x 2.",
             "", "| shape | D | N | S | k | us | GB/s | % of streaming | cuBLAS dense bf16 us | vs cuBLAS dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['D']} | {r['N']} | {r['S']:g} | {r['k']} | {r['us']:.1f} | {r['gbps']:.0f} | "
                     f"{r['pct_of_streaming']:.1f}% | {r['cublas_dense_us']:.1f} | {r['vs_cublas_dense']:.2f}x |")
    lines += ["", "Target (issue 18): S = 0.5 reads >= 80% of the streaming ceiling at 8B and 70B shapes:", ""]
    for r in res["rows"]:
        if r["S"] == 0.5:
            lines.append(f"- {r['shape']}: {r['pct_of_streaming']:.1f}% ({'met' if r['pct_of_streaming'] >= 80 else 'missed'})")
    teal_rows = [r for r in res["rows"] if "teal_us" in r]
    if not teal_rows:
        lines.append("- TEAL's kernel at the same shapes: not measured (no --teal in this run).")
    else:
        lines += ["", "Against TEAL's sparse GEMV (Triton, fp16, threshold given; same shapes, S and rotation):", "",
                  "| shape | S | ours us | TEAL us | ours vs TEAL | TEAL % of streaming |", "|---|---|---|---|---|---|"]
        for r in teal_rows:
            lines.append(f"| {r['shape']} | {r['S']:g} | {r['us']:.1f} | {r['teal_us']:.1f} | {r['vs_teal']:.2f}x | "
                         f"{r['teal_pct_of_streaming']:.1f}% |")
        lines += ["", "Target (issue 18): at S = 0.5, >= 1.2x TEAL's kernel:", ""]
        for r in teal_rows:
            if r["S"] == 0.5:
                lines.append(f"- {r['shape']}: {r['vs_teal']:.2f}x ({'met' if r['vs_teal'] >= 1.2 else 'missed'})")
    if res.get("crossover"):
        lines += ["", "## Batched path: T one-token kernel calls vs one bf16 GEMM", "",
                  "| T | S | T x kernel us | GEMM us |", "|---|---|---|---|"]
        for c in res["crossover"]:
            lines.append(f"| {c['T']} | {c['S']:g} | {c['kernel_rows_us']:.1f} | {c['torch_gemm_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="S = 0 and 0.5 only")
    p.add_argument("--only", default=None, help="shape name prefix, e.g. 8b")
    p.add_argument("--crossover", action="store_true", help="also the T = 1..16 crossover at 8b.o, S = 0.5")
    p.add_argument("--teal", default=None, metavar="DIR", help="a TEAL checkout (or its kernels/ folder): time its "
                   "sparse GEMV at the same shapes and S")
    args = p.parse_args()
    ceiling = streaming_gbps()["streaming_gbps"]
    sparsities = [0.0, 0.5] if args.quick else SPARSITIES
    teal = load_teal(args.teal) if args.teal else None
    rows = []
    for shape in SHAPES:
        if args.only and not shape[0].startswith(args.only):
            continue
        rows += bench_shape(*shape, ceiling, sparsities, teal)
    res = {"card": torch.cuda.get_device_name(), "streaming_gbps": ceiling, "rows": rows,
           "torch_version": torch.__version__}
    if args.crossover:
        res["crossover"] = crossover(4096, 4096, 0.5)
    out = Path(args.out)
    write_json(out / f"dense-kernels-{card_name()}.json", res)
    md = markdown(res)
    (out / f"dense-kernels-{card_name()}.md").write_text(md)
    print(md)
    if rows:
        print(f"median % of streaming at S = 0.5: "
              f"{statistics.median(r['pct_of_streaming'] for r in rows if r['S'] == 0.5):.1f}%")


if __name__ == "__main__":
    main()
