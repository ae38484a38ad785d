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


def gpu_skip_reason() -> str | None:
    """None when GPU tests can run; else which of the two things they need is missing."""
    try:
        from qsparse_infer import _C  # noqa: F401
    except ImportError:
        return "the compiled extension qsparse_infer._C is missing (install the package with `pip install .`)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (qsparse_infer._C is compiled)"
    try:
        from qsparse_infer.kernels._ext import gpu_available

        if gpu_available():
            return None
    except Exception as e:  # a driver problem: say what it is
        return f"no usable CUDA GPU ({e})"
    return "no CUDA GPU visible to qsparse_infer._C (torch sees one)"


GPU_SKIP_REASON = gpu_skip_reason()
GPU_OK = GPU_SKIP_REASON is None
requires_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_SKIP_REASON or "")


def pytest_collection_modifyitems(config, items):
    if GPU_OK:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _no_torch_compile():
    """transformers' BitNet code is decorated with @torch.compile; compiling on a 2-core CPU is slow and adds
    nothing to a numerical comparison, so run everything eagerly."""
    torch._dynamo.config.disable = True
    yield
