"""The compiled extension imports without a GPU; GPU calls then raise a clear RuntimeError."""
from __future__ import annotations

from pathlib import Path

import pytest

import qsparse_infer
from qsparse_infer import _ext


def _compiled():
    try:
        from qsparse_infer import _C
    except ImportError:
        if (Path(qsparse_infer.__file__).resolve().parent.parent / "pyproject.toml").is_file():
            pytest.skip("running from the source tree, which has no compiled _C (pip install . builds it)")
        raise  # an installed package without _C is a broken install
    return _C


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
