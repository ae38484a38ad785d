"""The persistent decode step (issue 16): the layers of a batch-1 decode step as ONE kernel launch
(csrc/decode/step_kernel.cuh), one CTA per SM, walking a schedule built here once per model.

Schedule: per layer qkv -> attention -> o -> gate_up -> down. Op j's tiles wait on ready[j - 1], the count of
the previous op's finished output units (512-column blocks of a projection, kv heads of attention), so a tile
starts as soon as its whole input exists, not when a grid has drained; in between, it prefetches the weight
rows it may read into L2. The first qkv reads the embedding that the kernel before it wrote.

Bits: every projection tile runs the one-token GEMV's own selection code, the int32 sums are exact in any
order, the epilogue is the shared one, and attention is the decode kernel's own per-CTA body with the same
split plan: the step is bit-identical to the multi-kernel one (tests/gpu/test_persistent_step_gpu.py). The
multi-kernel step stays as the prefill path and the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import decode as dk
from ..kernels._ext import current_stream_handle, ext
from ..kernels.linear import EPI_PLAIN, EPI_RESIDUAL, GLU_EPILOGUES, PackedTernary
from ..model.config import ModelConfig
from .weights import TopK

__all__ = ["PersistentStep", "OP_NAMES", "unsupported_for", "unsupported_reason"]

OP_NAMES = ("qkv", "attention", "o", "gate_up", "down")
COLS = 512  # columns per projection tile (t1::kColsPerCta)


def _stream() -> int:
    return current_stream_handle()


def unsupported_for(cfg: ModelConfig, k: TopK, kv_dtype: torch.dtype) -> str | None:
    """Why a model of this config, top-K counts and KV cache type cannot use the persistent step, or None."""
    if cfg.precision != "ternary":
        return "the persistent step serves ternary models only (full-precision ones run the multi-kernel step)"
    if isinstance(k.gate_up, tuple):
        return "the persistent step needs one top-K count for gate and up"
    max_d = max(cfg.hidden_size, cfg.q_size, cfg.intermediate_size)
    why = ext().step_unsupported(dk.DTYPE_CODE[kv_dtype], cfg.head_dim, cfg.num_heads // cfg.num_kv_heads, max_d)
    return None if why is None else f"the persistent step does not support this shape: {why}"


def unsupported_reason(model: Any) -> str | None:
    """Why `model` (a GpuModel) cannot use the persistent step, or None."""
    why = unsupported_for(model.cfg, model.topk, model.kv_dtype)
    if why is not None:
        return why
    for t in (model.k_cache, model.v_cache):
        if t.data_ptr() % 16 or (t[0].numel() * t.element_size()) % 16:
            return "the KV cache is not 16-byte aligned per layer"
    return None


@dataclass
class _OpInfo:
    layer: int
    name: str
    ntiles: int | None  # None: attention (depends on the position)


class PersistentStep:
    """The layers of `model`'s decode step (GpuModel: its h, qkv, attn, mlp buffers, caches and position) as
    one launch. run() goes between the embedding and the LM head. prefetch: L2 prefetch of each tile's
    possible weight rows before its wait (False, the default: rows are read only after the selection, which
    measured 4-26% faster at 2B4T and 8B, bench/NOTES-persistent.md "Change 3"). raw: keep every
    projection's int32 column sums of the last step (raw_sums(), tests)."""

    def __init__(self, model: Any, *, prefetch: bool = False, grid: int | None = None, raw: bool = False) -> None:
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(why)
        self.model = model
        cfg = model.cfg
        dev = model.device
        self.cache_dtype = dk.DTYPE_CODE[model.kv_dtype]
        self.G = cfg.num_heads // cfg.num_kv_heads
        self.max_d = max(cfg.hidden_size, cfg.q_size, cfg.intermediate_size)
        with torch.cuda.device(dev):
            limit = ext().step_max_grid(self.cache_dtype, cfg.head_dim, self.G, self.max_d)
        self.grid = limit if grid is None else int(grid)
        if not 1 <= self.grid <= limit:
            raise ValueError(f"grid must be in [1, {limit}] (every CTA must be resident), got {grid}")
        self.prefetch = bool(prefetch)
        k = model.topk
        eps = cfg.rms_norm_eps
        glu = GLU_EPILOGUES[cfg.activation]
        L0 = model.layers[0]
        groups = {"qkv": L0.qkv, "o": L0.o, "gate_up": L0.gate_up, "down": L0.down}
        # split-K sums and arrival counters per projection kind, shared by the layers (one layer's op is
        # finished, its sums read and zeroed, before the next layer's same op starts)
        self.acc = {g: torch.zeros(w.npad, dtype=torch.int32, device=dev) for g, w in groups.items()}
        self.arrive = {g: torch.zeros(-(-w.npad // COLS), dtype=torch.int32, device=dev) for g, w in groups.items()}
        self.raw = ({(i, g): torch.full((-(-w.npad // COLS) * COLS,), -7, dtype=torch.int32, device=dev)
                     for i in range(cfg.num_layers) for g, w in groups.items()} if raw else None)
        h, qkv, attn, mlp = model.h, model.qkv, model.attn, model.mlp
        blobs: list[bytes] = []
        self.ops: list[_OpInfo] = []
        offset = 0  # tile rotation: an op's tile 0 goes to the CTA after the previous op's last tile

        def gemv(i: int, name: str, w: PackedTernary, kk: int, x: torch.Tensor, norm: torch.Tensor | None,
                 epi: int, out: torch.Tensor, wait: tuple[int, int]) -> None:
            nonlocal offset
            ncb = -(-w.npad // COLS)
            groups_k = -(-kk // 4)
            r = max(1, min(self.grid // ncb, groups_k))
            raw_t = self.raw[(i, name)] if self.raw is not None else None
            blobs.append(ext().step_pack_gemv(
                wait[0], wait[1], len(self.ops), offset % self.grid, w.in_features, kk, int(w.packed.shape[1]),
                int(w.scales.numel()), epi, out.shape[1], r, ncb, int(self.prefetch), float(eps), x.data_ptr(),
                norm.data_ptr() if norm is not None else 0, w.packed.data_ptr(), w.colinfo.data_ptr(),
                w.scales.data_ptr(), h.data_ptr() if epi == EPI_RESIDUAL else 0, out.data_ptr(),
                self.acc[name].data_ptr(), self.arrive[name].data_ptr(), raw_t.data_ptr() if raw_t is not None else 0))
            self.ops.append(_OpInfo(i, name, ncb * r))
            offset += ncb * r

        def ncb_of(w: PackedTernary) -> int:
            return -(-w.npad // COLS)

        prev: tuple[int, int] = (-1, 0)
        for i, L in enumerate(model.layers):
            gemv(i, "qkv", L.qkv, k.attn, h, L.input_norm, EPI_PLAIN, qkv, prev)
            blobs.append(ext().step_pack_attention(len(self.ops) - 1, ncb_of(L.qkv), len(self.ops),
                                                   offset % self.grid, model.k_cache[i].data_ptr(),
                                                   model.v_cache[i].data_ptr()))
            self.ops.append(_OpInfo(i, "attention", None))
            offset += cfg.num_kv_heads
            gemv(i, "o", L.o, k.o, attn, L.attn_sub_norm, EPI_RESIDUAL, h, (len(self.ops) - 1, cfg.num_kv_heads))
            gemv(i, "gate_up", L.gate_up, k.mlp, h, L.post_norm, glu, mlp, (len(self.ops) - 1, ncb_of(L.o)))
            gemv(i, "down", L.down, k.down, mlp, L.ffn_sub_norm, EPI_RESIDUAL, h,
                 (len(self.ops) - 1, ncb_of(L.gate_up)))
            prev = (len(self.ops) - 1, ncb_of(L.down))
        blob = b"".join(blobs)
        self.schedule = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)
        self.ready = torch.zeros(len(self.ops), dtype=torch.int32, device=dev)
        self.done = torch.zeros(1, dtype=torch.int32, device=dev)
        self.prof: torch.Tensor | None = None

    def run(self, profile: bool = False) -> None:
        """The layers of one decode step at model.pos (call after the embedding, before the head).
        profile: record per (op, CTA) globaltimer stamps into self.prof (int64 [nops, grid, PROF_WORDS]:
        first-tile start ns (before its wait), tiles run, last-tile end ns, SM id, then the first tile's
        phases: wait done, selection done, product issued, tile end (attention: wait done, 0, 0, end); zero
        where the CTA had no tile)."""
        m, cfg, ws = self.model, self.model.cfg, self.model.attn_ws
        prof_ptr = 0
        if profile:
            if self.prof is None:
                self.prof = torch.zeros(len(self.ops), self.grid, ext().STEP_PROF_WORDS, dtype=torch.int64,
                                        device=m.device)
            self.prof.zero_()
            prof_ptr = self.prof.data_ptr()
        ext().decode_step(self.schedule.data_ptr(), len(self.ops), m.qkv.data_ptr(), m.qkv.shape[1], cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim, m.max_len, ws.max_splits, ws.min_chunk, m.pos.data_ptr(),
                          m.slot0.data_ptr(), m.cos_t.data_ptr(), m.sin_t.data_ptr(), m.attn.data_ptr(),
                          ws.partials.data_ptr(), ws.counters.data_ptr(), self.ready.data_ptr(), len(self.ops),
                          self.done.data_ptr(), prof_ptr, self.grid, self.max_d, self.cache_dtype, _stream())

    def raw_sums(self, layer: int, name: str) -> torch.Tensor:
        """int32 column sums of projection `name` of `layer` in the last step (needs raw=True)."""
        if self.raw is None:
            raise ValueError("construct with raw=True to keep the raw sums")
        return self.raw[(layer, name)]

    @property
    def op_names(self) -> list[str]:
        return [f"L{o.layer}.{o.name}" for o in self.ops]
