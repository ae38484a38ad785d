"""serving.make_runner picks the runner by the engine's device (the GPU runner is imported only when used)."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from qsparse_infer.serving import CpuRunner, make_runner


def test_make_runner_cpu_and_gpu(monkeypatch):
    built = []

    class FakeGpuRunner:
        def __init__(self, engine, **kw):
            built.append(kw)

    monkeypatch.setitem(sys.modules, "qsparse_infer.serving.gpu_runner",
                        types.SimpleNamespace(GpuBatchRunner=FakeGpuRunner))
    cfg = SimpleNamespace(max_seq_len=128, vocab_size=10)
    gpu_engine = SimpleNamespace(gpu=object(), config=cfg)
    assert isinstance(make_runner(gpu_engine, 16), FakeGpuRunner)
    assert built == [{"max_slots": 16, "max_len": 128}]
    cpu_engine = SimpleNamespace(gpu=None, config=cfg, model=None)
    runner = make_runner(cpu_engine, 3, 64)
    assert isinstance(runner, CpuRunner) and (runner.max_slots, runner.max_len) == (3, 64)
