"""Kernel-lab benchmark of the batched decode attention (attention_decode, issue 8).

BitNet-2B4T shape (nq 20, nkv 5, hd 128, bf16 cache), contexts 128 .. 16k at B = 1 and B = 16 at 1k.
Timing: CUDA events around replays of a CUDA graph that launches the kernel once per cache slot group,
rotating over enough slots that the KV bytes touched per replay exceed L2 several times (every call reads
its K/V from DRAM, as in a real decode step where the weights stream through L2 in between); median
microseconds per call. Also timed in the same run:
- streaming ceiling: max of an eager-style device copy (read + write bytes) and a read-only torch sum,
  both over 1 GiB, also median of graph replays;
- a tiny kernel (fill of 4 bytes) in the same graph setup: the per-launch floor;
- the old single-block-per-kv-head attention kernel (the prefill path, T = 1) at each context.
--sweep also times the split parameters (min_chunk x max_splits) at 256, 1k, 4k and 16k.

    python3 bench/attention.py [--json PATH] [--sweep] [--no-old]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import time_graph, write_json  # noqa: E402  (the kernel lab's timer and result writer)

from qsparse_infer.kernels import decode as dk  # noqa: E402

NQ, NKV, HD = 20, 5, 128
CONTEXTS = [128, 256, 512, 1024, 4096, 16384]
L2_DEFEAT_BYTES = 256 << 20
MAX_LAUNCHES = 512


def streaming_gbps() -> dict[str, float]:
    """The streaming ceiling of this run (qsparse_infer.kernels.ceilings: max of an eager copy and a streaming read)."""
    from qsparse_infer.kernels.ceilings import streaming_gbps as measure

    return measure()


def launch_floor_us() -> float:
    t = torch.zeros(1, device="cuda")
    return time_graph([lambda: t.fill_(1.0)] * 64)


class Case:
    """Caches [slots, nkv, ctx, hd] bf16 filled with random data, one launch per group of B slots."""

    def __init__(self, ctx: int, b: int, gen: torch.Generator) -> None:
        self.ctx, self.b = ctx, b
        self.kv_bytes = b * 2 * NKV * ctx * HD * 2
        self.n_launch = max(4, min(MAX_LAUNCHES, -(-L2_DEFEAT_BYTES // self.kv_bytes)))
        slots = self.n_launch * b
        self.kc = torch.randn(slots, NKV, ctx, HD, device="cuda", generator=gen).to(torch.bfloat16)
        self.vc = torch.randn(slots, NKV, ctx, HD, device="cuda", generator=gen).to(torch.bfloat16)
        self.qkv = torch.randn(b, (NQ + 2 * NKV) * HD, device="cuda", generator=gen)
        self.pos = torch.full((b,), ctx - 1, dtype=torch.int32, device="cuda")
        self.slots = [torch.arange(i * b, (i + 1) * b, dtype=torch.int32, device="cuda") for i in range(self.n_launch)]
        self.out = torch.empty(b, NQ * HD, device="cuda")

    def time_new(self, min_chunk: int = dk.DEFAULT_MIN_CHUNK, max_splits: int | None = None) -> float:
        ws = dk.AttentionWorkspace.create(self.b, NQ, NKV, HD, self.ctx, "cuda", min_chunk=min_chunk,
                                          max_splits=max_splits)
        return time_graph([lambda s=s: dk.attention_decode(self.qkv, NQ, NKV, HD, self.kc, self.vc, self.pos, s,
                                                           self.out, ws) for s in self.slots])

    def time_old(self) -> float:
        assert self.b == 1
        start = self.pos[:1]
        return time_graph([lambda i=i: dk.attention(self.qkv, NQ, NKV, HD, self.kc[i], self.vc[i], start, out=self.out)
                           for i in range(self.n_launch)], replays=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sweep", action="store_true", help="also sweep min_chunk x max_splits")
    ap.add_argument("--no-old", action="store_true", help="skip the old kernel (slow at long contexts)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    ceiling = streaming_gbps()
    floor = launch_floor_us()
    peak = ceiling["streaming_gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {ceiling['copy_gbps']:.0f} GB/s, read-only sum "
          f"{ceiling['read_gbps']:.0f} GB/s -> streaming ceiling {peak:.0f} GB/s; graph launch floor {floor:.2f} us")
    print(f"shape nq={NQ} nkv={NKV} hd={HD} bf16 cache; min_chunk {dk.DEFAULT_MIN_CHUNK} at B = 1 (GpuModel), "
          f"{dk.BATCHED_MIN_CHUNK} at B > 1 (batched runner); max_splits<={dk.DEFAULT_MAX_SPLITS}")
    print(f"{'ctx':>6} {'B':>3} {'us/call':>8} {'KV MB':>8} {'GB/s':>7} {'% strm':>7} {'old us':>9}")
    rows = []
    for ctx, b in [(c, 1) for c in CONTEXTS] + [(1024, 16)]:
        case = Case(ctx, b, gen)
        us = case.time_new(min_chunk=dk.DEFAULT_MIN_CHUNK if b == 1 else dk.BATCHED_MIN_CHUNK)
        old = None if args.no_old or b != 1 else case.time_old()
        gbps = case.kv_bytes / (us * 1e-6) / 1e9
        row = {"ctx": ctx, "B": b, "us": round(us, 3), "kv_bytes": case.kv_bytes, "gbps": round(gbps, 1),
               "pct_of_streaming": round(100 * gbps / peak, 1), "old_us": None if old is None else round(old, 2)}
        rows.append(row)
        print(f"{ctx:>6} {b:>3} {us:>8.2f} {case.kv_bytes / 1e6:>8.2f} {gbps:>7.0f} {row['pct_of_streaming']:>6.1f}% "
              f"{'-' if old is None else f'{old:.2f}':>9}")
        del case
    sweep = []
    if args.sweep:
        print("split sweep (B = 1): us/call for min_chunk x max_splits")
        for ctx in (256, 1024, 4096, 16384):
            case = Case(ctx, 1, gen)
            for mc in (32, 64, 128, 256):
                line = []
                for ms in (8, 16, 32, 64, 128):
                    us = case.time_new(mc, ms)
                    sweep.append({"ctx": ctx, "min_chunk": mc, "max_splits": ms, "us": round(us, 3)})
                    line.append(f"{ms}:{us:6.2f}")
                print(f"  ctx {ctx:>5} min_chunk {mc:>3}  " + "  ".join(line))
            del case
    if args.json:
        result = {"device": torch.cuda.get_device_name(), **{k: round(v, 1) for k, v in ceiling.items()},
                  "launch_floor_us": round(floor, 3), "shape": {"nq": NQ, "nkv": NKV, "hd": HD},
                  "rows": rows, "sweep": sweep}
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
