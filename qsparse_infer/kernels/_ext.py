"""Access to the compiled CUDA extension, with clear errors where it or a GPU is missing."""
from __future__ import annotations

import functools
import os
from types import ModuleType


@functools.cache
def ext() -> ModuleType:
    """The compiled module qsparse_infer._C. It imports without a GPU; its GPU functions then raise."""
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(missing_extension_reason()) from e
    if os.environ.get("QSPARSE_PDL", "1") == "0":  # programmatic dependent launch off (to measure it)
        _C.set_pdl(False)
    return _C


def built_without_cuda() -> bool:
    """True when the install left _C out on purpose (no nvcc at install time, or QSPARSE_BUILD_CUDA=OFF)."""
    try:
        from .. import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return False
    return not _build_info.CUDA_EXTENSION


def missing_extension_reason() -> str:
    """Why qsparse_infer._C cannot be imported, in one sentence with what to do."""
    try:
        from .. import _build_info  # type: ignore[attr-defined]  # written by CMakeLists.txt at install time
    except ImportError:
        return ("qsparse_infer._C (the CUDA extension) is not built into this installation. Install the package "
                "with `pip install .` from the repository root; importing the source tree directly has no _C.")
    if not _build_info.CUDA_EXTENSION:
        return (f"qsparse_infer was installed without its CUDA extension ({_build_info.REASON}); install the CUDA "
                f"toolkit and reinstall with `pip install .` for the GPU path")
    return "qsparse_infer._C (the CUDA extension) was built but does not import: reinstall the package"


def gpu_available() -> bool:
    """True when both torch and our extension can see a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return ext().gpu_count() > 0
    except RuntimeError:
        return False


def current_stream_handle(device_index: int | None = None) -> int:
    """The raw cudaStream_t (as an int) of torch's current stream on a device, the current one when None.

    `torch.cuda.current_stream(dev).cuda_stream` builds a Stream object and parses the device on every call:
    214 such calls took 3.4 ms of one eager mixed serving step's 15.9 ms of host time (bench/NOTES-serving.md,
    section 2). torch's compiled code reads the raw handle (`torch._C._cuda_getCurrentRawStream`) instead; so
    do the kernel wrappers, falling back to the public call on a torch without it. Graph capture and
    `torch.cuda.stream(s)` contexts change the current stream, and this reads it fresh each call."""
    import torch

    if device_index is None:
        device_index = torch.cuda.current_device()
    raw = _raw_stream_getter()
    if raw is not None:
        return int(raw(device_index))
    return torch.cuda.current_stream(device_index).cuda_stream


@functools.cache
def _raw_stream_getter():  # looked up once: a missing private API costs one getattr, not one per call
    import torch

    return getattr(torch._C, "_cuda_getCurrentRawStream", None)


CPU_HINT = "to run on the CPU instead, pass --device cpu (in Python: device=\"cpu\")"


def require_gpu(cpu_hint: str = CPU_HINT) -> None:
    """Raise RuntimeError naming what is missing (extension, driver or device), then `cpu_hint`: what to do
    instead, in the words of the caller (the CLI and Python spell the CPU option differently)."""
    import torch

    try:
        ext().require_gpu()
    except RuntimeError as e:
        reason = str(e).split("; use device=")[0]  # the extension's own advice is Python-only
        raise RuntimeError(f"{reason}; {cpu_hint}") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"torch cannot see a CUDA GPU (CPU-only torch build?); {cpu_hint}")
