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


def test_persistent_step_bindings_validate_without_a_gpu():
    """The persistent decode step's schedule packing and shape checks are host code: they work (and refuse
    bad arguments) on a machine without a GPU."""
    c = _compiled()
    assert c.STEP_PROF_WORDS == 8
    assert c.step_op_bytes() % 16 == 0
    assert c.step_unsupported(1, 128, 4, 6912) is None  # 2B4T, bf16 cache
    assert "16 bytes" in c.step_unsupported(1, 36, 2, 200)  # a 72-byte cache row
    assert "8 query heads" in c.step_unsupported(1, 128, 9, 4096)
    assert "14336" in c.step_unsupported(1, 128, 8, 28672)  # 70B's FFN input
    assert "bfloat16 or float32" in c.step_unsupported(2, 128, 4, 4096)
    ok = dict(x=16, norm_w=0, packed=32, colinfo=48, scales=64, residual=0, out=80, acc=96, arrive=112, raw=0)

    def pack(D=256, K=100, RB=64, R=2, ncb=1, epi=0, eps=1e-5, **ptr):
        p = {**ok, **ptr}
        return c.step_pack_gemv(-1, 0, 0, 0, D, K, RB, 1, epi, 256, R, ncb, 1, eps, p["x"], p["norm_w"], p["packed"],
                                p["colinfo"], p["scales"], p["residual"], p["out"], p["acc"], p["arrive"], p["raw"])

    assert len(pack()) == c.step_op_bytes()
    assert len(c.step_pack_attention(0, 1, 1, 0, 16, 32)) == c.step_op_bytes()
    for bad, match in ((dict(K=300), "K <= D"), (dict(K=0), "K <= D"), (dict(ncb=0), "tiling"),
                       (dict(RB=256), "tiling"), (dict(epi=1), "null"), (dict(x=0), "null"), (dict(eps=0.0), "eps")):
        with pytest.raises(ValueError, match=match):
            pack(**bad)
    with pytest.raises(ValueError, match="null"):
        c.step_pack_attention(0, 1, 1, 0, 0, 32)
