"""Kernel-lab benchmark of the causal prefill attention (kernels/decode.attention): variant 1 (one block per kv
head and query, csrc/decode/attention.cu) against variant 2 (64-row query tiles x 512-key splits,
csrc/decode/attention_tiled.cu), at the chunks the serving runner prefills.

BitNet-2B4T heads (nq 20, nkv 5, hd 128), bf16 cache of 4096 positions. Each case: T query tokens starting at
position `start` (keys 0 .. start + t). Median of CUDA-event timings over --reps calls, and the FLOP rate of
QK^T + PV (4 * T * mean keys * nq * hd).

    python3 bench/attention_prefill.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from qsparse_infer.kernels import decode as dk
from qsparse_infer.kernels.ceilings import median_seconds

NQ, NKV, HD, MAX_LEN = 20, 5, 128, 4096
CASES = [(128, 0), (512, 0), (64, 1024), (64, 3072), (512, 1536), (512, 3584)]


def time_us(fn, reps: int) -> float:
    return 1e6 * median_seconds(fn, reps, warmup=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(NKV, MAX_LEN, HD, generator=g, device="cuda").bfloat16()
    vc = torch.randn(NKV, MAX_LEN, HD, generator=g, device="cuda").bfloat16()
    rows = []
    for t, start in CASES:
        qkv = torch.randn(t, (NQ + 2 * NKV) * HD, generator=g, device="cuda")
        st = torch.tensor([start], dtype=torch.int32, device="cuda")
        out = torch.empty(t, NQ * HD, device="cuda")
        flop = 4.0 * t * (start + (t + 1) / 2) * NQ * HD
        row = {"T": t, "start": start, "gflop": flop / 1e9}
        for v in (1, 2):
            us = time_us(lambda: dk.attention(qkv, NQ, NKV, HD, kc, vc, st, out=out, variant=v), a.reps)
            row[f"v{v}_us"], row[f"v{v}_tflops"] = us, flop / us / 1e6
        row["speedup"] = row["v1_us"] / row["v2_us"]
        rows.append(row)
        print(f"T={t:4d} start={start:5d}: variant 1 {row['v1_us']:9.1f} us ({row['v1_tflops']:5.2f} TFLOP/s), "
              f"variant 2 {row['v2_us']:8.1f} us ({row['v2_tflops']:5.2f} TFLOP/s): {row['speedup']:.1f}x",
              file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "nq": NQ, "nkv": NKV, "hd": HD, "max_len": MAX_LEN,
                       "cases": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
