"""AttentionWorkspace sizing and validation (CPU: no kernel runs here; the kernel is tested in
test_attention_gpu.py)."""
from __future__ import annotations

import pytest

from qsparse_infer.kernels import decode as dk


def test_default_split_cap_and_sizes():
    ws = dk.AttentionWorkspace.create(3, 20, 5, 128, 16384, "cpu")
    assert (ws.max_splits, ws.min_chunk) == (dk.DEFAULT_MAX_SPLITS, dk.DEFAULT_MIN_CHUNK)
    assert ws.partials.numel() == 3 * 20 * ws.max_splits * 132 and ws.counters.numel() == 3 * 5
    assert ws.record_floats(34) == 40  # max, sum, 2 pad, 36 (34 rounded up to 4)
    assert int(ws.counters.abs().sum()) == 0  # the kernel relies on zero counters between launches
    # short caches need fewer splits: ceil(max_len / min_chunk), which never changes a row's plan
    assert dk.AttentionWorkspace.create(1, 20, 5, 128, 100, "cpu").max_splits == -(-100 // dk.DEFAULT_MIN_CHUNK)
    assert dk.AttentionWorkspace.create(1, 8, 2, 64, 1000, "cpu", min_chunk=7, max_splits=128).max_splits == 128


@pytest.mark.parametrize("kwargs,match", [
    ({"max_splits": 0}, "max_splits"), ({"max_splits": 129}, "max_splits"), ({"min_chunk": 0}, "min_chunk"),
])
def test_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.AttentionWorkspace.create(1, 20, 5, 128, 100, "cpu", **kwargs)


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match="max_batch"):
        dk.AttentionWorkspace.create(0, 20, 5, 128, 100, "cpu")


@pytest.mark.parametrize("fused", [True, False])
def test_rope_append_attention_dispatch(monkeypatch, fused):
    """The decoders' entry point passes its arguments to the fused kernel, or (lab switch off) to
    rope_append_batch and then the unfused kernel, unchanged and in that order."""
    calls = []
    monkeypatch.setattr(dk, "FUSED_ROPE", fused)
    monkeypatch.setattr(dk, "attention_decode", lambda *a, **kw: calls.append(("attn", a, kw)) or "out")
    monkeypatch.setattr(dk, "rope_append_batch", lambda *a, **kw: calls.append(("rope", a, kw)))
    args = ["qkv", 8, 2, 64, "kc", "vc", "pos", "slots", "out", "ws"]
    assert dk.rope_append_attention(*args, "cos", "sin") == "out"
    if fused:
        assert calls == [("attn", tuple(args), {"rope": ("cos", "sin")})]
    else:
        assert calls == [("rope", ("qkv", 8, 2, 64, "cos", "sin", "pos", "kc", "vc", "slots"), {}),
                         ("attn", tuple(args), {})]
