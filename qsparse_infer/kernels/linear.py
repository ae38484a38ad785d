"""Python wrappers of the ternary-linear CUDA kernels: packing, int8 quantize + top-K, GEMV and GEMM.

`ternary_linear` is the contract the GPU decoder uses (docs/ARCHITECTURE.md). Every wrapper validates
shapes, dtypes, devices and contiguity before any kernel runs, and names what is wrong.

Graph capture: kernels take the current stream (`_ext.current_stream_handle`); the split-K workspaces and
the select buffers are cached per device and grow only outside capture (the first call with a
given size must happen before capturing). They are reset by the kernels themselves, so the cache is
shared by every call on a device: use one stream at a time per device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import packing
from ._ext import current_stream_handle, ext

EPI_PLAIN, EPI_RESIDUAL, EPI_RELU2, EPI_SILU = 0, 1, 2, 3
GLU_EPILOGUES = {"relu2": EPI_RELU2, "silu": EPI_SILU}
MAX_GEMV_TOKENS = 8
# The select kernel keeps the token row in shared memory (4 B per channel, <= 200 KB), and its
# compaction scan packs two 16-bit counts; int32 accumulation is exact far beyond this (|acc| <= 128 D).
MAX_IN_FEATURES = 49152
# Above this D, a separate select launch + GEMV beats the redundant per-CTA top-K (measured on H100,
# bench/NOTES-kernels.md: split wins from D = 4096 up; fused wins or ties at D = 2560).
FUSED_MAX_D = 3072
_SMEM_LIMIT = 200 * 1024
_GEMM_K_ALIGN = 64


def column_info(segment_sizes: tuple[int, ...] | list[int], layout: str) -> torch.Tensor:
    """int32 [Npad]: -1 for padding columns, else (segment << 24) | logical output index."""
    cmap = packing.column_map(list(segment_sizes), layout)
    starts = torch.tensor([sum(segment_sizes[:i]) for i in range(1, len(segment_sizes))], dtype=torch.int64)
    seg = torch.bucketize(cmap.clamp(min=0), starts, right=True)
    return torch.where(cmap >= 0, (seg << 24) | cmap, torch.full_like(cmap, -1)).to(torch.int32)


@dataclass
class PackedTernary:
    """One packed projection group (format v1): packed uint8 [D, Npad/4], scales float32 [nseg]."""

    packed: torch.Tensor
    scales: torch.Tensor
    segment_sizes: tuple[int, ...]
    layout: str = packing.LAYOUT_CONCAT
    colinfo: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.segment_sizes = tuple(int(n) for n in self.segment_sizes)
        if not self.segment_sizes or any(n <= 0 for n in self.segment_sizes):
            raise ValueError(f"segment_sizes must be positive integers, got {self.segment_sizes}")
        if self.layout not in (packing.LAYOUT_CONCAT, packing.LAYOUT_INTERLEAVE):
            raise ValueError(f"layout must be 'concat' or 'interleave', got {self.layout!r}")
        if self.layout == packing.LAYOUT_INTERLEAVE and len(self.segment_sizes) != 2:
            raise ValueError(f"the interleave layout holds exactly 2 segments (gate, up), got {self.segment_sizes}")
        npad = packing.packed_columns(list(self.segment_sizes), self.layout)
        p = self.packed
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] * 4 != npad:
            raise ValueError(f"packed must be uint8 [D, {npad // 4}] for segments {self.segment_sizes}, got "
                             f"{getattr(p, 'dtype', type(p))} {tuple(getattr(p, 'shape', ()))}")
        if not 1 <= p.shape[0] <= MAX_IN_FEATURES:
            raise ValueError(f"packed has {p.shape[0]} input channels; supported 1..{MAX_IN_FEATURES}")
        if not p.is_contiguous():
            raise ValueError("packed must be contiguous")
        s = self.scales
        if (not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.dim() != 1
                or s.numel() != len(self.segment_sizes) or not s.is_contiguous()):
            raise ValueError(f"scales must be a contiguous float32 [{len(self.segment_sizes)}] tensor, got "
                             f"{getattr(s, 'dtype', type(s))} {tuple(getattr(s, 'shape', ()))}")
        if s.device != p.device:
            raise ValueError(f"scales are on {s.device} but packed is on {p.device}")
        self.colinfo = column_info(self.segment_sizes, self.layout).to(p.device)

    @property
    def in_features(self) -> int:
        return int(self.packed.shape[0])

    @property
    def out_features(self) -> int:
        return sum(self.segment_sizes)

    @property
    def npad(self) -> int:
        return int(self.packed.shape[1]) * 4

    @classmethod
    def from_cpu(cls, packed: torch.Tensor, scales: torch.Tensor | list[float], segment_sizes, layout: str =
                 packing.LAYOUT_CONCAT, device: str | torch.device = "cuda") -> "PackedTernary":
        """Move CPU tensors (as read from an engine file) to the GPU."""
        scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        return cls(packed.contiguous().to(device), scales.contiguous().to(device), tuple(segment_sizes), layout)

    @classmethod
    def from_ternary(cls, segments: list[torch.Tensor], betas: list[float] | torch.Tensor,
                     layout: str = packing.LAYOUT_CONCAT, device: str | torch.device = "cuda") -> "PackedTernary":
        """Pack int8 ternary segments ([N_s, D] each) on the CPU with packing.pack_ternary and upload."""
        packed = packing.pack_ternary([s.cpu() for s in segments], layout)
        return cls.from_cpu(packed, betas, [s.shape[0] for s in segments], layout, device)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_cuda(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_tensor(name: str, t, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_x(x, d: int | None = None) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, D], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    t, dx = x.shape
    if t < 1:
        raise ValueError("x must hold at least one token")
    if d is not None and dx != d:
        raise ValueError(f"x has {dx} channels but the weight expects in_features={d}")
    if not 1 <= dx <= MAX_IN_FEATURES:
        raise ValueError(f"x has {dx} channels; supported 1..{MAX_IN_FEATURES}")
    return int(t), int(dx)


def _check_k(k, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= d:
        raise ValueError(f"k={k} out of range: must be in 1..{d} (D={d})")
    return k


def _check_norm(norm_weight, d: int) -> None:
    if norm_weight is not None:
        _check_tensor("norm_weight", norm_weight, (d,), (torch.float32,))


# ---------------------------------------------------------------------------------------------
# Per-device cached buffers (allocated outside capture, kept alive for captured graphs)
# ---------------------------------------------------------------------------------------------

_buffers: dict[tuple, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # old buffers a captured graph may still point at


def _buffer(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (device.index, name)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"linear_kernels: workspace {name!r} must grow to {numel} elements during CUDA "
                               "graph capture; run the call once with these shapes before capturing")
        if buf is not None:
            _retired.append(buf)
        # Zeroed once: the split-K workspace and counters must start (and are kept) at zero.
        buf = torch.zeros(max(numel, 1024), dtype=dtype, device=device)
        _buffers[key] = buf
    return buf


def _stream(device: torch.device) -> int:
    return current_stream_handle(device.index)


@dataclass(frozen=True)
class GemvPlan:
    fused: bool
    chunks_per_tile: int
    splits: int
    ntiles: int


_sm_count: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def plan_gemv(w: PackedTernary, k: int, device: torch.device, variant: str | None = None,
              shape: tuple[int, int] | None = None) -> GemvPlan:
    """Launch shape: 64-column chunks per tile, K-splits to fill ~2 CTAs per SM, fused or two launches."""
    sms = _sms(device)
    nchunks = w.npad // 64
    c = 8
    while c > 1 and c // 2 >= nchunks:
        c //= 2
    ntiles = -(-nchunks // c)
    groups = -(-k // 4)
    nslots = 8 * 32 // c
    # At most ~2 co-resident CTAs per SM (121 registers x 256 threads): one wave, no tail wave.
    splits = max(1, min(2 * sms // ntiles, -(-groups // nslots)))
    if nchunks >= 192:  # wide outputs (gate/up): tiles alone fill the GPU; no split-K (bench/gemv_sweep.py)
        c = 8 if nchunks >= 800 else 4
        splits, ntiles = 1, -(-nchunks // c)
    if shape is not None:  # (chunks per tile, splits): benchmarks sweep these
        c, splits = shape
        if c not in (1, 2, 4, 8) or splits < 1:
            raise ValueError(f"GEMV shape must be (chunks in 1/2/4/8, splits >= 1), got {shape}")
        ntiles = -(-nchunks // c)
    smem = ext().gemv_fused_smem_bytes(w.in_features, k, c)
    if variant is None:
        fused = w.in_features <= FUSED_MAX_D and smem <= _SMEM_LIMIT
    elif variant in ("fused", "split"):
        fused = variant == "fused"
        if fused and smem > _SMEM_LIMIT:
            raise ValueError(f"the fused GEMV needs {smem} B of shared memory at D={w.in_features}, k={k}")
    else:
        raise ValueError(f"variant must be None, 'fused' or 'split', got {variant!r}")
    return GemvPlan(fused, c, splits, ntiles)


GEMM_VARIANTS = {"tiled": 1, "skinny": 2, "prefill": 3}
# GEMM variant 2 ("skinny", gemm_skinny.cu): a CTA per 16 tokens x 128 columns, the k range split over a
# cluster so that a few tokens still fill the card. Variant 3 ("prefill", gemm_prefill.cu): 64 tokens x 128
# columns per CTA through a cp.async pipeline, one weight tile read per 64 tokens, no split-K. Measured on an
# H200 (bench/NOTES-serving.md section 4, results/prefill-gemm-h200.json, 2B4T groups): variant 3 wins where
# its grid holds at least ~0.8 CTAs per SM (gate_up from 64 tokens: 28.5 vs 40.9 us; qkv at 256: 28.5 vs
# 32.7; down at 512: 71 vs 77) and loses below (o and down at 256, 80 CTAs: 28 vs 21 and 53 vs 44 us),
# where one CTA's latency-bound k loop is the whole time. Its 128-token tiles (244 registers, 2 CTAs per
# SM) were slower than the 64-token ones at every measured shape, up to 2048 tokens; they stay as
# `_shape=(0, 128)`. Variant 1 (64-token tiles, weights unpacked byte by byte into shared memory) took
# 500-600 us per 2B4T layer at 1-64 tokens against 47-99 us (bench/NOTES-batched.md); `_variant="tiled"`.
PREFILL_MIN_TOKENS = 64
PREFILL_MIN_CTAS_PER_SM = 0.8


def plan_gemm(w: PackedTernary, t: int, device: torch.device, variant: str | None = None,
              shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """(GEMM variant 1, 2 or 3, its launch parameter): k-splits for variant 2, tokens per CTA for variant 3.

    By default variant 3 from PREFILL_MIN_TOKENS tokens where its 64-token grid gives at least
    PREFILL_MIN_CTAS_PER_SM CTAs per SM, else variant 2, which splits the k range over up to 8 CTAs of a
    cluster until ~2 CTAs per SM are busy, keeping at least two 32-row k steps per warp (8 per CTA).
    `shape` = (0, splits) or (0, tile tokens: 64 or 128) overrides the parameter (kernel lab)."""
    if variant is not None and variant not in GEMM_VARIANTS:
        raise ValueError(f"GEMM variant must be None, 'tiled', 'skinny' or 'prefill', got {variant!r}")
    if variant is None:
        ctas = -(-w.npad // 128) * -(-t // 64)
        variant = "prefill" if t >= PREFILL_MIN_TOKENS and ctas >= PREFILL_MIN_CTAS_PER_SM * _sms(device) \
            else "skinny"
    v = GEMM_VARIANTS[variant]
    if v == 1:
        return 1, 1
    if v == 3:
        if shape is None:
            return 3, 64
        if shape[1] not in (64, 128):
            raise ValueError(f"prefill GEMM shape must be (0, 64 or 128), got {shape}")
        return 3, int(shape[1])
    if shape is not None:
        if shape[1] < 1:
            raise ValueError(f"GEMM shape must be (0, splits >= 1), got {shape}")
        return 2, int(shape[1])
    ctas = -(-w.npad // 128) * -(-t // 16)
    steps = -(-w.in_features // 32)
    splits = 1
    while splits < 8 and ctas * splits < 2 * _sms(device) and steps >= 16 * splits:
        splits *= 2
    return 2, splits


T1_MAX_D = 32768  # = _C.gemv_t1_max_d(): the one-token kernel keeps 32 values of x per thread, 1024 threads
# Where the one-token kernel wins, measured on an H100 at S = 0.6 (bench/NOTES-kernels.md): 2b4t.down
# (D = 6912) 19.8 us against 27.6 us for variant 1; 8b.attn (4096) 20.6 vs 21.0 us. From D = 8192 its
# 32 values per thread and, above that, its 1024-thread form lose: 70b.gate_up 47.6 vs 43.6 us (same
# run, bench/results/gemv-sweep-h100.json), 70b.attn 46.7 vs 29.2 us, 70b.down 190 vs 59 us. So by
# default it serves D <= 7168 (BitNet-2B4T's 2560 and 6912, Llama-8B's 4096).
T1_AUTO_MAX_D = 7168


_t1_variants: dict[tuple[int, int, int], int] = {}


def _t1_variant(d: int, r: int, threads: int = 256) -> int:
    """3 where the prefetching one-token kernel's shared-memory tile fits at (D, R), else 2."""
    if (d, r, threads) not in _t1_variants:
        fits = ext().gemv_t1p_smem_bytes(d, r, threads) <= ext().gemv_t1p_max_smem_bytes()
        _t1_variants[(d, r, threads)] = 3 if fits else 2
    return _t1_variants[(d, r, threads)]


def plan_t1(w: PackedTernary, k: int, device: torch.device) -> int:
    """CTAs per 512-column block (a thread-block cluster, <= 16) for the one-token GEMV.

    Measured on an H200 (bench/results/gemv-sweep-h200.json, every R and CTA size at the four 2B4T
    projections): the best R gives about 64 CTAs in all when the projection is dense and about 32 when it is
    sparse. A dense CTA streams its rows from a tile prefetched before the selection (variant 3), so more CTAs
    bring more bandwidth; a sparse CTA's rows are few, and more CTAs only lengthen the cluster reduction.
    """
    blocks = -(-w.npad // 512)
    target = 64 if k >= w.in_features else 32
    r = 1
    while r < 16 and blocks * r < target:
        r *= 2
    return r


def t1_threads(d: int) -> int:
    """CTA size of the one-token GEMV: 512 threads above D = 4096 (BitNet-2B4T's down projection, D = 6912,
    ran 9.3 vs 10.8 us dense and 14.7 vs 18.3 us at S = 0.6 with 512 rather than 256 on an H200), else 256."""
    return 512 if 4096 < d <= 7168 else 256


# ---------------------------------------------------------------------------------------------
# Public wrappers
# ---------------------------------------------------------------------------------------------


def quantize_topk(x: torch.Tensor, k: int, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-5, _threads: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 + top-k of |x'| (x' = RMSNorm(x) * norm_weight if given).

    Returns (idx int32 [T, k] ascending, q int8 [T, k], gamma float32 [T]); matches
    model.quant.topk_indices / quantize_int8 (the spec) bit for bit when no norm is fused.
    `_threads` (tests, the kernel lab) forces the CTA size per token: 256 or 1024 (0: by T).
    """
    if _threads not in (0, 256, 1024):
        raise ValueError(f"_threads must be 0, 256 or 1024, got {_threads}")
    t, d = _check_x(x)
    _check_k(k, d)
    _check_norm(norm_weight, d)
    _check_cuda("x", x)
    if norm_weight is not None:
        _check_cuda("norm_weight", norm_weight, x.device)
    if x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return quantize_topk(x, k, norm_weight, eps, _threads)
    idx = torch.empty((t, k), dtype=torch.int32, device=x.device)
    q = torch.empty((t, k), dtype=torch.int8, device=x.device)
    gamma = torch.empty((t,), dtype=torch.float32, device=x.device)
    ext().quantize_topk(x.data_ptr(), int(x.dtype == torch.bfloat16),
                        norm_weight.data_ptr() if norm_weight is not None else 0, float(eps), t, d, k,
                        idx.data_ptr(), q.data_ptr(), k, gamma.data_ptr(), 0, 0, _stream(x.device), _threads)
    return idx, q, gamma


def ternary_linear(x: torch.Tensor, w: PackedTernary, k: int, *, norm_weight: torch.Tensor | None = None,
                   norm_eps: float = 1e-5, residual: torch.Tensor | None = None, glu: str | None = None,
                   out: torch.Tensor | None = None, _raw_acc: torch.Tensor | None = None,
                   _variant: str | None = None, _shape: tuple[int, int] | None = None,
                   _path: str | None = None) -> torch.Tensor:
    """BitLinear over a packed ternary group: [RMSNorm] -> absmax int8 -> top-k -> int32 product -> epilogue.

    T <= 8 tokens run the gather-GEMV (only the k selected rows are read); more run the tensor-core
    GEMM on masked int8 activations (variant 2, "skinny", or variant 3, "prefill", where its grid fills the card:
    plan_gemm; variant 1, "tiled", only when asked for). One
    token goes to a one-token kernel: variant 3 ("t1p", weight rows prefetched into shared memory) for dense
    projections where its tile fits, else variant 2 ("t1"), unless `_variant` ("t1", "t1p", "fused" /
    "split" = GEMV variant 1, "tiled" / "skinny" / "prefill" = a GEMM variant for any T) says otherwise. `_raw_acc`
    (int32 [T, Npad], tests) receives the exact int32 accumulators per packed column; `_shape` overrides the launch shape
    (benchmarks): (chunks per tile, K-splits) for variant 1, (CTA size or 0, CTAs per column block) for t1/t1p,
    (0, k-splits) for the skinny GEMM, (0, 64 or 128 tokens per CTA) for the prefill GEMM.
    `_path` forces a path for any T (batched decode picks paths by measured crossovers, bench/batched_linear.py):
    "t1" (a one-token kernel once per row), "gemv" (variant 1 in groups of <= 8 rows), "gemm" (tensor cores).
    Every path gives each row the same bits: exact int32 sums, a shared epilogue, and with norm_weight the
    same order of the RMSNorm's sum of squares in every kernel (tests/kernels/test_linear_kernels_gpu.py checks it).
    """
    if not isinstance(w, PackedTernary):
        raise TypeError(f"w must be a PackedTernary, got {type(w).__name__}")
    t, d = _check_x(x, w.in_features)
    _check_k(k, d)
    _check_norm(norm_weight, d)
    if glu is not None:
        if glu not in GLU_EPILOGUES:
            raise ValueError(f"glu must be None, 'relu2' or 'silu', got {glu!r}")
        if w.layout != packing.LAYOUT_INTERLEAVE:
            raise ValueError("glu needs an interleaved gate/up weight (layout='interleave')")
        if residual is not None:
            raise ValueError("glu and residual epilogues cannot be combined")
        n_out, epi = w.segment_sizes[0], GLU_EPILOGUES[glu]
    else:
        n_out, epi = w.out_features, EPI_PLAIN
    if residual is not None:
        _check_tensor("residual", residual, (t, n_out), (torch.float32,))
        epi = EPI_RESIDUAL
    if out is not None:
        _check_tensor("out", out, (t, n_out), (torch.float32,))
    if _path not in (None, "t1", "gemv", "gemm"):
        raise ValueError(f"_path must be None, 't1', 'gemv' or 'gemm', got {_path!r}")
    if _raw_acc is not None:
        _check_tensor("_raw_acc", _raw_acc, (t, w.npad), (torch.int32,))
    dev = x.device
    _check_cuda("x", x)
    _check_cuda("w.packed", w.packed, dev)
    for name, tensor in (("norm_weight", norm_weight), ("residual", residual), ("out", out), ("_raw_acc", _raw_acc)):
        if tensor is not None:
            _check_cuda(name, tensor, dev)
    if dev.index != torch.cuda.current_device():  # kernels launch on the current device
        with torch.cuda.device(dev):
            return ternary_linear(x, w, k, norm_weight=norm_weight, norm_eps=norm_eps, residual=residual, glu=glu,
                                  out=out, _raw_acc=_raw_acc, _variant=_variant, _shape=_shape, _path=_path)
    if out is None:
        out = torch.empty((t, n_out), dtype=torch.float32, device=dev)
    rows = {"t1": 1, "gemv": MAX_GEMV_TOKENS}.get(_path or "", t)
    if t > rows:  # a forced per-token path: run it on groups of rows (views: no copies)
        for r0 in range(0, t, rows):
            sl = slice(r0, min(t, r0 + rows))
            ternary_linear(x[sl], w, k, norm_weight=norm_weight, norm_eps=norm_eps,
                           residual=None if residual is None else residual[sl], glu=glu, out=out[sl],
                           _raw_acc=None if _raw_acc is None else _raw_acc[sl], _variant=_variant, _shape=_shape,
                           _path=_path)
        return out
    if _path == "t1" and _variant is None and d > T1_AUTO_MAX_D:
        _variant = "t1"
    elif _path == "gemv" and t == 1 and _variant in (None, "t1"):
        _variant = "fused" if plan_gemv(w, k, dev).fused else "split"

    gemm = _path == "gemm" or _variant in GEMM_VARIANTS
    stream = _stream(dev)
    xb = int(x.dtype == torch.bfloat16)
    norm_ptr = norm_weight.data_ptr() if norm_weight is not None else 0
    res_ptr = residual.data_ptr() if residual is not None else 0
    raw_ptr = _raw_acc.data_ptr() if _raw_acc is not None else 0
    rb = int(w.packed.shape[1])
    one_token = _variant in ("t1", "t1p")
    use_t1 = d <= T1_AUTO_MAX_D if _variant is None else (one_token and d <= T1_MAX_D)
    if t == 1 and k >= 1 and use_t1 and not gemm:
        r = _shape[1] if (one_token and _shape is not None) else plan_t1(w, k, dev)
        threads = _shape[0] if (one_token and _shape is not None) else t1_threads(d)
        if _variant is None:
            # variant 3 (prefetched rows) for dense projections where its tile fits; sparse ones run
            # variant 2, since its speculative prefetch measured slower (bench/NOTES-latency.md)
            variant = _t1_variant(d, r, threads) if k >= d else 2
        else:
            variant = 3 if _variant == "t1p" else 2
        ext().ternary_gemv_t1(x.data_ptr(), xb, norm_ptr, float(norm_eps), d, k, w.packed.data_ptr(), rb,
                              w.colinfo.data_ptr(), w.scales.data_ptr(), int(w.scales.numel()), epi, res_ptr,
                              out.data_ptr(), n_out, raw_ptr, r, stream, threads, variant)
    elif t <= MAX_GEMV_TOKENS and not gemm:
        if one_token:
            raise ValueError("the one-token GEMV variants (t1, t1p) take exactly one token and 1 <= k")
        plan = plan_gemv(w, k, dev, _variant, _shape)
        ws = _buffer(dev, "ws", MAX_GEMV_TOKENS * w.npad, torch.int32)
        ctr = _buffer(dev, "counters", MAX_GEMV_TOKENS * plan.ntiles, torch.int32)
        idx_ptr = q_ptr = gamma_ptr = 0
        ld = (k + 3) // 4 * 4
        if not plan.fused:
            idx_buf = _buffer(dev, "sel_idx", t * ld, torch.int32)
            q_buf = _buffer(dev, "sel_q", t * ld, torch.int8)
            g_buf = _buffer(dev, "sel_gamma", t, torch.float32)
            idx_ptr, q_ptr, gamma_ptr = idx_buf.data_ptr(), q_buf.data_ptr(), g_buf.data_ptr()
            ext().quantize_topk(x.data_ptr(), xb, norm_ptr, float(norm_eps), t, d, k, idx_ptr, q_ptr, ld,
                                gamma_ptr, 0, 0, stream)
        ext().ternary_gemv(int(plan.fused), x.data_ptr(), xb, norm_ptr, float(norm_eps), t, d, k, idx_ptr, q_ptr,
                           ld, gamma_ptr, w.packed.data_ptr(), rb, w.colinfo.data_ptr(), w.scales.data_ptr(), epi,
                           res_ptr, out.data_ptr(), n_out, raw_ptr, plan.chunks_per_tile, plan.splits,
                           ws.data_ptr(), ctr.data_ptr(), stream)
    else:
        ldq = (d + _GEMM_K_ALIGN - 1) // _GEMM_K_ALIGN * _GEMM_K_ALIGN
        qd = _buffer(dev, "gemm_q", t * ldq, torch.int8)
        idx_buf = _buffer(dev, "gemm_idx", t * k, torch.int32)
        q_buf = _buffer(dev, "gemm_qsel", t * k, torch.int8)
        g_buf = _buffer(dev, "gemm_gamma", t, torch.float32)
        ext().quantize_topk(x.data_ptr(), xb, norm_ptr, float(norm_eps), t, d, k, idx_buf.data_ptr(),
                            q_buf.data_ptr(), k, g_buf.data_ptr(), qd.data_ptr(), ldq, stream)
        forced = _variant in GEMM_VARIANTS  # _path="gemm" alone leaves the variant and splits to the plan
        variant, param = plan_gemm(w, t, dev, _variant if forced else None, _shape if forced else None)
        ext().ternary_gemm(qd.data_ptr(), ldq, g_buf.data_ptr(), t, d, w.packed.data_ptr(), rb, w.colinfo.data_ptr(),
                           w.scales.data_ptr(), epi, res_ptr, out.data_ptr(), n_out, raw_ptr, stream, variant,
                           param if variant == 2 else 1, param if variant == 3 else 128)
    return out


def pack_ternary_gpu(segments: list[torch.Tensor], layout: str = packing.LAYOUT_CONCAT) -> torch.Tensor:
    """GPU twin of packing.pack_ternary: int8 segments [N_s, D] (CUDA) -> uint8 [D, Npad/4]."""
    if not segments:
        raise ValueError("pack_ternary_gpu needs at least one segment")
    d = segments[0].shape[-1] if segments[0].dim() == 2 else -1
    for i, s in enumerate(segments):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[1] != d or s.dtype != torch.int8:
            raise ValueError(f"segment {i} must be int8 [N, {d}], got {getattr(s, 'dtype', None)} "
                             f"{tuple(getattr(s, 'shape', ()))}")
        _check_cuda(f"segment {i}", s, segments[0].device)
    sizes = [int(s.shape[0]) for s in segments]
    dev = segments[0].device
    info = column_info(sizes, layout).to(dev)
    rb = info.numel() // 4
    full = torch.cat(segments, dim=0).contiguous()
    packed = torch.empty((d, rb), dtype=torch.uint8, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    ext().ternary_pack(full.data_ptr(), info.data_ptr(), packed.data_ptr(), err.data_ptr(), full.shape[0], d, rb,
                       _stream(dev))
    if int(err.item()):
        raise ValueError("pack_ternary_gpu: values outside {-1, 0, 1}")
    return packed


def unpack_ternary_gpu(packed: torch.Tensor, segment_sizes: list[int],
                       layout: str = packing.LAYOUT_CONCAT) -> torch.Tensor:
    """GPU twin of packing.unpack_ternary: uint8 [D, Npad/4] (CUDA) -> int8 [sum(segment_sizes), D]."""
    npad = packing.packed_columns(list(segment_sizes), layout)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.uint8 \
            or packed.shape[1] * 4 != npad:
        raise ValueError(f"packed must be uint8 [D, {npad // 4}], got {getattr(packed, 'dtype', None)} "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    _check_cuda("packed", packed)
    packed = packed.contiguous()
    dev = packed.device
    info = column_info(segment_sizes, layout).to(dev)
    d = int(packed.shape[0])
    out = torch.empty((sum(segment_sizes), d), dtype=torch.int8, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    ext().ternary_unpack(packed.data_ptr(), info.data_ptr(), out.data_ptr(), err.data_ptr(), d, npad // 4,
                         _stream(dev))
    if int(err.item()):
        raise ValueError("packed ternary data contains the invalid code 3 (corrupt file?)")
    return out


def bytes_read(w: PackedTernary, k: int) -> int:
    """Bytes of packed weights the gather-GEMV must read for one token keeping k channels."""
    return k * int(w.packed.shape[1])


__all__ = ["PackedTernary", "quantize_topk", "ternary_linear", "pack_ternary_gpu", "unpack_ternary_gpu",
           "column_info", "plan_gemv", "plan_gemm", "bytes_read", "MAX_GEMV_TOKENS", "FUSED_MAX_D"]
