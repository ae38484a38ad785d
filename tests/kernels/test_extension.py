"""The compiled extension imports without a GPU; GPU calls then raise a clear RuntimeError."""
from __future__ import annotations

from pathlib import Path

import pytest

import qsparse_infer
from qsparse_infer.kernels import _ext


def _build_info():
    try:
        from qsparse_infer import _build_info
    except ImportError:
        return None
    return _build_info


def _compiled():
    try:
        from qsparse_infer import _C
    except ImportError:
        if (Path(qsparse_infer.__file__).resolve().parent.parent / "pyproject.toml").is_file():
            pytest.skip("running from the source tree, which has no compiled _C (pip install . builds it)")
        info = _build_info()
        if info is not None and not info.CUDA_EXTENSION:
            pytest.skip(f"installed without the CUDA extension: {info.REASON}")
        raise  # an installed package without _C, whose build says it made one, is a broken install
    return _C


def test_missing_extension_reason_says_what_to_do(monkeypatch):
    """Without _C the error names why (the install had no nvcc, or this is the source tree) and what to do."""
    import sys
    import types

    no_nvcc = types.ModuleType("qsparse_infer._build_info")
    no_nvcc.CUDA_EXTENSION, no_nvcc.REASON = False, "no CUDA compiler (nvcc) was found when the package was installed"
    monkeypatch.setitem(sys.modules, "qsparse_infer._build_info", no_nvcc)
    msg = _ext.missing_extension_reason()
    assert "without its CUDA extension" in msg and "nvcc" in msg and "reinstall" in msg
    monkeypatch.setitem(sys.modules, "qsparse_infer._build_info", None)  # None in sys.modules: ImportError
    assert "pip install ." in _ext.missing_extension_reason()


def test_build_info_matches_the_extension():
    """An installed package records whether its build made _C, and the record is true."""
    info = _build_info()
    if info is None:
        pytest.skip("running from the source tree (no install-time build record)")
    import importlib.util

    assert info.CUDA_EXTENSION == (importlib.util.find_spec("qsparse_infer._C") is not None)
    assert info.CUDA_EXTENSION or "nvcc" in info.REASON


def test_extension_imports_and_counts_gpus():
    c = _compiled()
    n = c.gpu_count()
    assert isinstance(n, int) and n >= 0
    assert _ext.ext() is c


def test_require_gpu_is_clear_without_gpu():
    c = _compiled()
    if c.gpu_count() > 0:
        c.require_gpu()  # must not raise with a GPU
        return
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        c.require_gpu()
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        _ext.require_gpu()
    assert _ext.gpu_available() is False
