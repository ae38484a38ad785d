"""The streaming-read kernel (the benches' ceiling) reads every byte: its per-block sums add up (mod 2^32) to
the wrapping sum of the buffer's 32-bit words computed by torch, for odd sizes and grids. Integer sums, so
the check is exact."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import requires_gpu  # noqa: E402

from qsparse_infer.kernels.ceilings import stream_read, streaming_gbps  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]


def _words_sum(t: torch.Tensor) -> int:
    return int(t.view(torch.int32).to(torch.int64).sum()) % 2**32


@pytest.mark.parametrize("n16", [1, 7, 1001, 65_537, 3_000_017])
@pytest.mark.parametrize("blocks", [None, 1, 3])
def test_stream_read_sums_every_word(n16, blocks):
    g = torch.Generator(device="cuda").manual_seed(n16)
    data = torch.randint(-2**31, 2**31 - 1, (n16 * 4,), generator=g, device="cuda", dtype=torch.int32)
    out = stream_read(data, blocks=blocks)
    if blocks is not None:
        assert out.numel() == blocks
    assert int(out.to(torch.int64).sum()) % 2**32 == _words_sum(data)


def test_stream_read_rejects_unaligned():
    data = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        stream_read(data[:40])
    with pytest.raises(ValueError, match="16-byte aligned"):
        stream_read(data[4:36])


def test_streaming_gbps_is_sane():
    r = streaming_gbps(nbytes=256 << 20, reps=3)
    assert r["streaming_gbps"] == max(r["copy_gbps"], r["read_gbps"]) > 50
