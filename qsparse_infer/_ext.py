"""Access to the compiled CUDA extension, with clear errors where it or a GPU is missing."""
from __future__ import annotations

import functools
import os
from types import ModuleType


@functools.cache
def ext() -> ModuleType:
    """The compiled module qsparse_infer._C. It imports without a GPU; its GPU functions then raise."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(
            "qsparse_infer._C (the CUDA extension) is not built into this installation. Install the package "
            "with `pip install .` from the repository root; importing the source tree directly has no _C."
        ) from e
    if os.environ.get("QSPARSE_PDL", "1") == "0":  # programmatic dependent launch off (to measure it)
        _C.set_pdl(False)
    return _C


def gpu_available() -> bool:
    """True when both torch and our extension can see a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return ext().gpu_count() > 0
    except RuntimeError:
        return False


def require_gpu() -> None:
    """Raise RuntimeError naming what is missing (extension, driver or device)."""
    import torch

    ext().require_gpu()
    if not torch.cuda.is_available():
        raise RuntimeError("torch cannot see a CUDA GPU (CPU-only torch build?); use device=\"cpu\"")
