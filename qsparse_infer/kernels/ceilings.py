"""The streaming ceiling: the bandwidth every benchmark compares its kernels against.

The larger of (a) an eager device-to-device copy, counting bytes read + written, and (b) our streaming-read
kernel (csrc/bench/stream.cu: 16-byte streaming loads over a 1 GiB buffer, nothing written but one value
per block), both measured here, in the same process as the numbers they judge. A copy captured in a CUDA
graph is not used: on the H200 it runs at ~2.8 TB/s against ~4.2 TB/s for both of these, which would
inflate every "% of ceiling" by 1.5x.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from ._ext import ext

DEFAULT_BYTES = 1 << 30


def median_seconds(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    """Median wall time of fn on the current stream, CUDA events around each call (the benchmarks' timer for
    work long enough that one launch's latency does not matter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def stream_read(data: torch.Tensor, out: torch.Tensor | None = None, blocks: int | None = None) -> torch.Tensor:
    """Read all of `data` (contiguous CUDA, nbytes a multiple of 16, 16-byte aligned) once with the streaming
    kernel. Returns int32-viewable uint32 partial sums [blocks] (as int64 here: sum them mod 2**32 to get the
    wrapping sum of data's 32-bit words)."""
    if not data.is_cuda or not data.is_contiguous():
        raise ValueError("data must be a contiguous CUDA tensor")
    nbytes = data.numel() * data.element_size()
    if nbytes % 16 or data.data_ptr() % 16:
        raise ValueError(f"data must be 16-byte aligned with a size that is a multiple of 16 (got {nbytes} bytes)")
    blocks = blocks or ext().stream_read_blocks()
    if out is None:
        out = torch.empty(blocks, dtype=torch.int32, device=data.device)
    if out.dtype != torch.int32 or not out.is_cuda or out.numel() < blocks:
        raise ValueError(f"out must be an int32 CUDA tensor of >= {blocks} entries")
    ext().stream_read(data.data_ptr(), nbytes, out.data_ptr(), blocks, torch.cuda.current_stream().cuda_stream)
    return out[:blocks]


def streaming_gbps(device: torch.device | str | None = None, nbytes: int = DEFAULT_BYTES,
                   reps: int = 10) -> dict[str, float]:
    """{"streaming_gbps": the ceiling, "copy_gbps": eager copy (read + write), "read_gbps": streaming read}."""
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
        dst = torch.empty_like(src)
        copy_s = median_seconds(lambda: dst.copy_(src), reps)
        del dst
        blocks = ext().stream_read_blocks()
        out = torch.empty(blocks, dtype=torch.int32, device="cuda")
        read_s = median_seconds(lambda: stream_read(src, out, blocks), reps)
        del src, out
        torch.cuda.empty_cache()
    copy = 2 * nbytes / copy_s / 1e9
    read = nbytes / read_s / 1e9
    return {"streaming_gbps": max(copy, read), "copy_gbps": copy, "read_gbps": read}
