"""Serving: many requests decoded together. `runner.py` (the ModelRunner protocol, CpuRunner), `gpu_runner.py`
(GpuBatchRunner), `scheduler.py` (admission, chunked prefill, stop rules, streaming), `api.py` (the
OpenAI-compatible FastAPI app, which knows only the scheduler), `batch.py` (Engine.generate on a list);
`qsparse serve` is cli_serve.py. Nothing here imports engine.py: callers pass an engine-like object."""
from __future__ import annotations

from typing import Any

from .runner import CpuRunner, ModelRunner

DEFAULT_MAX_SLOTS = {"cpu": 8, "cuda": 64}


def make_runner(engine: Any, max_slots: int, max_len: int | None = None) -> ModelRunner:
    """The batched runner for the engine's device: GpuBatchRunner on the GPU, else CpuRunner."""
    max_len = max_len or engine.config.max_seq_len
    if getattr(engine, "gpu", None) is not None:
        from .gpu_runner import GpuBatchRunner

        return GpuBatchRunner(engine, max_slots=max_slots, max_len=max_len)
    return CpuRunner(engine, max_slots, max_len)


__all__ = ["CpuRunner", "ModelRunner", "make_runner", "DEFAULT_MAX_SLOTS"]
