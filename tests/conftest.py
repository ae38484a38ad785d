"""Shared test setup: tests marked @pytest.mark.gpu skip cleanly without a CUDA GPU and the built extension."""
from __future__ import annotations

import pytest


def _gpu_ok() -> bool:
    try:
        from qsparse_infer._ext import gpu_available

        return gpu_available()
    except Exception:  # no torch CUDA, no _C, no driver: all mean "no GPU here"
        return False


GPU_OK = _gpu_ok()
requires_gpu = pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU and the compiled qsparse_infer._C")


def pytest_collection_modifyitems(config, items):
    if GPU_OK:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the compiled qsparse_infer._C")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
