"""Shared test set-up: the GPU skip marker (tests marked @pytest.mark.gpu skip cleanly without a CUDA GPU and
the built extension), and the helper modules next to this file made importable."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib (so the *installed* package is tested); that mode does not put this
# folder on sys.path, so add it for the shared builders (tests/builders.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


@pytest.fixture(autouse=True, scope="session")
def _no_torch_compile():
    """transformers' BitNet code is decorated with @torch.compile; compiling on a 2-core CPU is slow and adds
    nothing to a numerical comparison, so run everything eagerly."""
    torch._dynamo.config.disable = True
    yield
