"""Shared test set-up: the GPU skip marker, and the helper modules next to this file made importable."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib (so the *installed* package is tested); that mode does not put this
# folder on sys.path, so add it for the shared builders (tests/builders.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _gpu_ready() -> bool:
    try:
        from qsparse_infer import _ext

        return _ext.gpu_available()
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and the compiled extension")


@pytest.fixture(autouse=True, scope="session")
def _no_torch_compile():
    """transformers' BitNet code is decorated with @torch.compile; compiling on a 2-core CPU is slow and adds
    nothing to a numerical comparison, so run everything eagerly."""
    torch._dynamo.config.disable = True
    yield
