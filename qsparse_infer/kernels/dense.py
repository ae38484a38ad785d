"""Python wrapper of the full-precision linear family (format v2, bf16 weights): `dense_linear`, the contract the
GPU decoders use for these models, as `ternary_linear` is for ternary ones (docs/ARCHITECTURE.md).

  x' = RMSNorm(x) * norm_weight (fp32; when norm_weight is given), keep the k largest |x'| (ties: the lower
  index), optionally times ||x'|| / ||kept|| (L2 re-scale), y = kept · W (+ bias) with W bf16 [D, N] (rows =
  input channels), then plain / + residual / silu(gate) * up.

Paths:
- one token: the gather-GEMV `_C.dense_gemv` (csrc/dense/gemv_bf16.cu): selection fused into every CTA, only
  the k selected rows read, exact fp32 accumulation in a fixed, documented order; x' stays fp32;
- more tokens (prefill, batched decode) and shapes the kernel cannot take: torch. The top-K mask is applied on a
  dense [T, D] copy and one bf16 GEMM (cuBLAS, fp32 accumulation) reads every weight row once for all rows;
  x' is rounded to bf16 for it, as the torch bf16 peer does. Above one token the dense GEMM beats any gather:
  each extra row of a gather re-reads its selected rows, while the GEMM reads W once (bench/dense_linear.py
  measures the crossover).
The two paths agree to bf16 rounding (~1e-3 relative), not bit for bit.

Graph capture: the kernel's workspace and counters are cached per device and grow only outside capture (the
first call with given shapes must come before capturing); the last CTA of each column block resets its counter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._ext import current_stream_handle, ext

DENSE_EPI_PLAIN, DENSE_EPI_RESIDUAL, DENSE_EPI_SILU_GLU = 0, 1, 2
COLS_PER_BLOCK = 512
MAX_SPLITS = 64


@dataclass
class DenseWeight:
    """One full-precision projection group on the GPU: weight_t bf16 [D, sum(segments)] (segments side by side:
    q|k|v, gate|up), an optional fp32 bias [sum(segments)], and the re-scale rule after the top-K."""

    weight_t: torch.Tensor
    segment_sizes: tuple[int, ...]
    bias: torch.Tensor | None = None
    rescale: str = "none"

    def __post_init__(self) -> None:
        self.segment_sizes = tuple(int(n) for n in self.segment_sizes)
        w = self.weight_t
        if not isinstance(w, torch.Tensor) or w.dtype != torch.bfloat16 or w.dim() != 2:
            raise ValueError(f"weight_t must be a bf16 [D, N] tensor, got {getattr(w, 'dtype', type(w))} "
                             f"{tuple(getattr(w, 'shape', ()))}")
        if not w.is_contiguous():
            raise ValueError("weight_t must be contiguous")
        if not self.segment_sizes or any(n <= 0 for n in self.segment_sizes) or sum(self.segment_sizes) != w.shape[1]:
            raise ValueError(f"segment sizes {self.segment_sizes} do not add up to weight_t's {w.shape[1]} columns")
        if self.bias is not None:
            b = self.bias
            if b.dtype != torch.float32 or tuple(b.shape) != (w.shape[1],) or not b.is_contiguous():
                raise ValueError(f"bias must be a contiguous float32 [{w.shape[1]}] tensor")
            if b.device != w.device:
                raise ValueError(f"bias is on {b.device} but weight_t on {w.device}")
        if self.rescale not in ("none", "l2"):
            raise ValueError(f"rescale must be 'none' or 'l2', got {self.rescale!r}")

    @property
    def in_features(self) -> int:
        return int(self.weight_t.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight_t.shape[1])

    @classmethod
    def from_cpu(cls, weight_t: torch.Tensor, segment_sizes, bias: torch.Tensor | None = None,
                 rescale: str = "none", device: str | torch.device = "cuda") -> "DenseWeight":
        """Upload an engine file's tensors (any float dtype: widened or rounded to bf16 here)."""
        w = weight_t.to(device=device, dtype=torch.bfloat16).contiguous()
        b = None if bias is None else bias.to(device=device, dtype=torch.float32).contiguous()
        return cls(w, tuple(segment_sizes), b, rescale)


# ---------------------------------------------------------------------------------------------
# The torch path (also the spec the kernel is tested against, in fp64 in the tests)
# ---------------------------------------------------------------------------------------------


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.float()
    if weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def topk_rows(x: torch.Tensor, k: int, rescale: str) -> torch.Tensor:
    """x [T, D] fp32 with each row's top-k |x| kept (ties: the lower index), then the L2 re-scale."""
    d = x.shape[-1]
    if k >= d:
        return x
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[:, :k]
    kept = torch.zeros_like(x).scatter_(-1, order, x.gather(-1, order))
    if rescale == "l2":
        full = x.pow(2).sum(-1, keepdim=True)
        part = kept.pow(2).sum(-1, keepdim=True)
        kept = kept * torch.where(part > 0, full.sqrt() / part.clamp(min=1e-30).sqrt(), torch.ones_like(part))
    return kept


_mm_out_dtype: bool | None = None


def _bf16_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a bf16 [T, D] @ w bf16 [D, N] -> fp32 [T, N]; fp32 output straight from cuBLAS where torch offers it."""
    global _mm_out_dtype
    if _mm_out_dtype is not False:
        try:
            y = torch.mm(a, w, out_dtype=torch.float32)
            _mm_out_dtype = True
            return y
        except (TypeError, RuntimeError, NotImplementedError):
            if _mm_out_dtype:
                raise
            _mm_out_dtype = False
    return torch.mm(a, w).float()


def _torch_path(x, w: DenseWeight, ks: tuple[int, ...], norm_weight, norm_eps, residual, glu, out):
    xn = _rmsnorm(x, norm_weight, norm_eps)
    if glu is not None:
        m = w.segment_sizes[0]
        parts = []
        for seg, k in enumerate(ks):
            xs = topk_rows(xn, k, w.rescale).to(torch.bfloat16)
            parts.append(_bf16_matmul(xs, w.weight_t[:, seg * m:(seg + 1) * m]))
        y = torch.nn.functional.silu(parts[0]) * parts[1]
    else:
        y = _bf16_matmul(topk_rows(xn, ks[0], w.rescale).to(torch.bfloat16), w.weight_t)
        if w.bias is not None:
            y = y + w.bias
        if residual is not None:
            y = residual + y
    if out is None:
        return y
    out.copy_(y)
    return out


# ---------------------------------------------------------------------------------------------
# The kernel path
# ---------------------------------------------------------------------------------------------

_buffers: dict[tuple, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # old buffers a captured graph may still point at
_sm_count: dict[int, int] = {}


def _buffer(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (device.index, name)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"dense_linear: workspace {name!r} must grow to {numel} elements during CUDA graph "
                               "capture; run the call once with these shapes before capturing")
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(numel, 1024), dtype=dtype, device=device)  # counters must start at zero
        _buffers[key] = buf
    return buf


def plan_splits(d: int, n: int, k: int, nseg: int, device: torch.device) -> int:
    """CTAs along the selected rows per 512-column block: about two CTAs per SM in all (one above D = 8192,
    where the kernel runs 512 or 1024 threads), at least 32 rows per CTA."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    ctas = (2 if d <= 8192 else 1) * _sm_count[idx]
    blocks = -(-n // COLS_PER_BLOCK) * nseg
    return max(1, min(MAX_SPLITS, ctas // blocks, -(-k // 32)))


def kernel_fits(d: int, kmax: int, norm: bool) -> bool:
    smem = ext().dense_gemv_smem_bytes(d, kmax, norm)
    return 0 < smem <= 220 * 1024


def _check(name: str, t, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def dense_linear(x: torch.Tensor, w: DenseWeight, k: int | tuple[int, int], *,
                 norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-5,
                 residual: torch.Tensor | None = None, glu: str | None = None, out: torch.Tensor | None = None,
                 _path: str | None = None, _splits: int | None = None) -> torch.Tensor:
    """The projection above for the rows of x [T, D] (fp32 or bf16, CUDA). k: kept channels (D = dense), or with
    glu="silu" (gate | up weight) either one k or (k_gate, k_up). out [T, N] fp32 (N = the segment width with
    glu) may alias residual. _path: "kernel" or "torch" forces a path (tests, benchmarks); _splits the kernel's
    row split."""
    if not isinstance(w, DenseWeight):
        raise TypeError(f"w must be a DenseWeight, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be a float32 or bfloat16 [T, D] tensor, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_cuda or not x.is_contiguous():
        raise ValueError("x must be a contiguous CUDA tensor")
    t, d = x.shape
    if d != w.in_features or t < 1:
        raise ValueError(f"x has {d} channels but the weight expects in_features={w.in_features}")
    dev = x.device
    if w.weight_t.device != dev:
        raise ValueError(f"the weight is on {w.weight_t.device} but x is on {dev}")
    if glu is not None:
        if glu != "silu":
            raise ValueError(f"glu must be None or 'silu' for full-precision models, got {glu!r}")
        if len(w.segment_sizes) != 2 or w.segment_sizes[0] != w.segment_sizes[1]:
            raise ValueError("glu needs a gate | up weight of two equal segments")
        if residual is not None:
            raise ValueError("glu and residual epilogues cannot be combined")
        ks = tuple(k) if isinstance(k, (tuple, list)) else (k, k)
        n_out = w.segment_sizes[0]
    else:
        if isinstance(k, (tuple, list)):
            raise ValueError("a (k_gate, k_up) pair needs glu='silu'")
        ks, n_out = (k,), w.out_features
    for kk in ks:
        if isinstance(kk, bool) or not isinstance(kk, int) or not 1 <= kk <= d:
            raise ValueError(f"k={kk!r} out of range: must be an int in 1..{d}")
    if norm_weight is not None:
        _check("norm_weight", norm_weight, (d,), (torch.float32,), dev)
    if residual is not None:
        _check("residual", residual, (t, n_out), (torch.float32,), dev)
    if out is not None:
        _check("out", out, (t, n_out), (torch.float32,), dev)
    if _path not in (None, "kernel", "torch"):
        raise ValueError(f"_path must be None, 'kernel' or 'torch', got {_path!r}")
    fits = kernel_fits(d, max(ks), norm_weight is not None)
    if _path == "kernel" and (t != 1 or not fits):
        raise ValueError("the dense kernel takes one token whose selection fits in shared memory")
    if _path == "torch" or t != 1 or not fits:
        return _torch_path(x, w, ks, norm_weight, norm_eps, residual, glu, out)
    if dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return dense_linear(x, w, k, norm_weight=norm_weight, norm_eps=norm_eps, residual=residual, glu=glu,
                                out=out, _path=_path, _splits=_splits)
    if out is None:
        out = torch.empty((1, n_out), dtype=torch.float32, device=dev)
    nseg = len(ks)
    splits = _splits or plan_splits(d, n_out, max(ks), nseg, dev)
    if not 1 <= splits <= 1024:
        raise ValueError(f"_splits must be in 1..1024, got {splits}")
    blocks = -(-n_out // COLS_PER_BLOCK)
    ws = _buffer(dev, "ws", 2 * splits * blocks * COLS_PER_BLOCK, torch.float32)
    counters = _buffer(dev, "counters", blocks, torch.int32)
    epi = DENSE_EPI_SILU_GLU if glu else (DENSE_EPI_RESIDUAL if residual is not None else DENSE_EPI_PLAIN)
    if w.bias is not None and epi != DENSE_EPI_PLAIN:
        raise ValueError("a bias goes with the plain epilogue only (q/k/v)")
    ext().dense_gemv(x.data_ptr(), int(x.dtype == torch.bfloat16),
                     norm_weight.data_ptr() if norm_weight is not None else 0, float(norm_eps), d, ks[0],
                     ks[-1], nseg, w.weight_t.data_ptr(), w.out_features, n_out, n_out if glu else 0,
                     int(w.rescale == "l2"), epi, w.bias.data_ptr() if w.bias is not None else 0,
                     residual.data_ptr() if residual is not None else 0, out.data_ptr(), splits, ws.data_ptr(),
                     counters.data_ptr(), current_stream_handle(dev.index))
    return out


def bytes_read(w: DenseWeight, k: int | tuple[int, int]) -> int:
    """Weight bytes one token reads at k (per segment for a (k_gate, k_up) pair)."""
    if isinstance(k, (tuple, list)):
        m = w.segment_sizes[0]
        return sum(kk * m * 2 for kk in k)
    return k * w.out_features * 2


__all__ = ["DenseWeight", "dense_linear", "topk_rows", "plan_splits", "bytes_read", "kernel_fits"]
