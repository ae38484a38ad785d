"""GpuBatchRunner: the batched GPU decoder behind the server (the ModelRunner protocol, SERVING_API.md).

Memory: the weights (shared with a GpuModel when given an Engine that has one) and a KV pool
[L, S + 1, nkv, max_len, hd]: one slot per sequence plus a scratch slot that padding rows use.

Decode step for B active slots: the host writes the slot ids into a static device buffer and replays the
CUDA graph of the smallest batch bucket >= B (1, 2, 4, ..., max_slots); the other rows of the bucket name
the scratch slot, whose position is reset to 0 at the start of every step, so they compute garbage at
position 0 of the scratch slot and never touch a real slot's cache or sampling state. Inside the graph:
gather each row's last token and position, embedding, per layer ternary_linear over the B rows (path by
batch size, see LinearPolicy), attention_decode with RoPE + KV append fused in (each row in its own slot), LM head over
the rows, and one batched sampling launch that advances each slot's position and RNG step.

Prefill of a slot runs the chunk's T tokens through the same T-row layer stack as GpuModel's prefill, into
the slot's view of the pool (k_pool[layer, slot] is a contiguous [nkv, max_len, hd] cache), starting at the
slot's current position, so chunked prefill continues where the last chunk ended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..generate.sampling import SamplingSettings
from ..gpu.weights import GpuWeights, TopK, decode_settings, host_weight_bytes, run_head, run_layers
from ..kernels import decode as dk
from ..model.config import ModelConfig, SparsityConfig
from ..model.reference import rope_cos_sin

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MARGIN = 512 * 2**20  # graphs, linear-kernel workspaces, allocator slack


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _signed64(seed: int) -> int:
    """A 64-bit seed as the int64 the device buffer holds (the kernel reads the same bits as uint64)."""
    seed = int(seed) & ((1 << 64) - 1)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


@dataclass(frozen=True)
class LinearPolicy:
    """Which ternary_linear path serves a batch of B rows (crossovers: bench/batched_linear.py).
    B == 1: the one-token kernel ("t1") if t1_single_row, else variant 1; B <= gemv_max_rows: the gather-GEMV
    (variant 1, groups of <= 8 rows, each row reads only its selected weight rows); larger B: the tensor-core
    GEMM (its skinny variant 2 up to 64 rows: every weight row read once for all B rows).

    Every path rounds a row identically (the kernels share the RMSNorm's summation order and the int32 sums are
    exact), so a seeded request gives the same tokens alone and batched (SERVING_API.md) whichever is chosen;
    the policy only picks the fastest."""

    # 1, measured on an H200 (bench/NOTES-batched.md, batched-linear-h200.json; 2B4T): the skinny GEMM beats the
    # gather-GEMV from B = 2 at S = 0 and S = 0.6 alike (a layer's four projections at B = 2: 50 vs 87 us at
    # S = 0, 74 vs 90 us at S = 0.6; at B = 16: 77 vs 450 and 104 vs 357 us). B = 1 keeps the one-token kernel.
    gemv_max_rows: int = 1
    t1_single_row: bool = True

    def path(self, rows: int) -> str:
        if rows == 1 and self.t1_single_row:
            return "t1"
        return "gemv" if rows <= self.gemv_max_rows else "gemm"


class GpuBatchRunner:
    """Up to max_slots sequences decoded together on one GPU (see the module docstring)."""

    def __init__(self, engine: Any, sparsity: SparsityConfig | None = None, max_slots: int | None = None,
                 max_len: int | None = None, kv_dtype: torch.dtype | None = None,
                 device: str | torch.device = "cuda", *, use_graph: bool = True,
                 policy: LinearPolicy | None = None) -> None:
        from ..kernels.linear import ternary_linear

        self._ternary_linear = ternary_linear
        # an Engine (with or without a GpuModel to share weights with), or an EngineFile
        ef = getattr(engine, "file", engine)
        shared: GpuWeights | None = getattr(getattr(engine, "gpu", None), "weights", None)
        cfg: ModelConfig = ef.config
        self.cfg = cfg
        self.sparsity = sparsity or getattr(engine, "sparsity", None) or ef.sparsity
        self.topk = TopK.of(cfg, self.sparsity)
        self.policy = policy or LinearPolicy()
        if kv_dtype is None:  # the engine's choice (Engine.load(kv_cache=...)), else bf16
            kv_dtype = getattr(getattr(engine, "gpu", None), "kv_dtype", torch.bfloat16)
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots must be a positive integer or None (as many as fit), got {max_slots!r}")
        self.max_len, self.device = decode_settings(cfg, max_len, kv_dtype, device)
        self.kv_dtype = kv_dtype
        if shared is not None and shared.device != self.device:
            shared = None
        self.vocab_size = cfg.vocab_size
        self.use_graph = use_graph

        self.max_slots = self._fit_slots(ef, shared, max_slots)
        self.scratch = self.max_slots  # the pool's extra slot, where padding rows compute
        self.buckets = [b for b in BUCKETS if b < self.max_slots] + [self.max_slots]
        try:
            self.weights = shared if shared is not None else GpuWeights(ef, self.device)
            self._allocate()
        except torch.cuda.OutOfMemoryError:
            self.__dict__.clear()
            torch.cuda.empty_cache()
            raise RuntimeError("CUDA out of memory while setting up the batched decoder; lower max_slots or "
                               "max_len") from None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.use_graph:
            self._capture_all()
        for s in range(self.max_slots + 1):
            self._reset_slot(s)

    # -- setup ----------------------------------------------------------------------------------

    def _slot_bytes(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * self.max_len * c.head_dim * self.kv_dtype.itemsize

    def _buffer_bytes(self, slots: int) -> int:
        c = self.cfg
        rows = c.hidden_size * 3 + c.q_size * 2 + 2 * c.kv_size + c.intermediate_size + c.vocab_size
        return slots * rows * 4 + (slots + 1) * (c.vocab_size + 64)

    def _fit_slots(self, ef: Any, shared: GpuWeights | None, max_slots: int | None) -> int:
        """max_slots as asked (checked against free memory) or, when None, as many as fit (<= 64)."""
        weights = 0 if shared is not None else host_weight_bytes(ef)
        with torch.cuda.device(self.device):
            free, _ = torch.cuda.mem_get_info()
        per_slot = self._slot_bytes()
        avail = free - weights - _MARGIN
        fit = 0
        while fit < 256 and (fit + 2) * per_slot + self._buffer_bytes(fit + 1) <= avail:
            fit += 1  # fit slots + the scratch slot
        if max_slots is None:
            if fit < 1:
                raise RuntimeError(self._no_fit_message(1, free, weights, per_slot))
            return min(64, fit)
        if (max_slots + 1) * per_slot + self._buffer_bytes(max_slots) > avail:
            raise RuntimeError(self._no_fit_message(max_slots, free, weights, per_slot, fit))
        return max_slots

    def _no_fit_message(self, slots: int, free: int, weights: int, per_slot: int, fit: int = 0) -> str:
        avail = free - weights - _MARGIN - self._buffer_bytes(slots)
        per_pos = per_slot // self.max_len
        positions = max(0, avail // ((slots + 1) * per_pos)) if per_pos else 0
        return (f"not enough GPU memory for {slots} slots of {self.max_len} positions: the KV pool needs "
                f"{_gib((slots + 1) * per_slot)} ({slots} slots + 1 scratch slot, {self.kv_dtype}), the weights "
                f"{_gib(weights)}, {_gib(free)} free. {fit} slots of {self.max_len} positions would fit, or "
                f"{slots} slots of {positions} positions")

    def _allocate(self) -> None:
        cfg, dev, s1, bm = self.cfg, self.device, self.max_slots + 1, self.max_slots
        f32, i32 = torch.float32, torch.int32
        pool = (cfg.num_layers, s1, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        self.k_pool = torch.zeros(pool, dtype=self.kv_dtype, device=dev)
        self.v_pool = torch.zeros(pool, dtype=self.kv_dtype, device=dev)
        self.kv_bytes = 2 * self.k_pool.numel() * self.k_pool.element_size()
        cos, sin = rope_cos_sin(torch.arange(self.max_len), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        half = cfg.head_dim // 2
        self.cos_t = cos[:, :half].contiguous().to(dev)
        self.sin_t = sin[:, :half].contiguous().to(dev)
        # per-slot sequence state (row r = slot r; row max_slots = scratch), read and written by the graphs
        self.seen = torch.zeros(s1, cfg.vocab_size, dtype=torch.uint8, device=dev)
        self.fparams = torch.tensor([[0.0, 1.0, 1.0]] * s1, dtype=f32, device=dev)  # greedy, no filters
        self.iparams = torch.zeros(s1, dtype=i32, device=dev)
        self.rng = torch.zeros(s1, 2, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(s1, dtype=i32, device=dev)
        self.token = torch.zeros(s1, dtype=i32, device=dev)
        # per-row buffers of a decode step (a bucket of nb rows uses the first nb)
        self.slots_host = torch.zeros(bm, dtype=i32).pin_memory()
        self.tokens_host = torch.zeros(bm, dtype=i32).pin_memory()
        self.slots_dev = torch.zeros(bm, dtype=i32, device=dev)
        self.row_tokens = torch.zeros(bm, dtype=i32, device=dev)
        self.row_pos = torch.zeros(bm, dtype=i32, device=dev)
        self.out_tokens = torch.zeros(bm, dtype=i32, device=dev)
        self.h = torch.zeros(bm, cfg.hidden_size, dtype=f32, device=dev)
        self.qkv = torch.zeros(bm, cfg.q_size + 2 * cfg.kv_size, dtype=f32, device=dev)
        self.attn = torch.zeros(bm, cfg.q_size, dtype=f32, device=dev)
        self.mlp = torch.zeros(bm, cfg.intermediate_size, dtype=f32, device=dev)
        self.normed = torch.zeros(bm, cfg.hidden_size, dtype=f32, device=dev)
        self.logits = torch.zeros(bm, cfg.vocab_size, dtype=f32, device=dev)
        self.slot_ids = torch.arange(s1, dtype=i32, device=dev)  # slot_ids[s : s + 1]: a device [1] naming s
        # the batched attention's scratch (split partials, arrival counters)
        self.attn_ws = dk.AttentionWorkspace.create(bm, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                    self.max_len, dev, min_chunk=dk.BATCHED_MIN_CHUNK)
        self._len = [0] * s1
        self._state = ["free"] * s1  # free -> begun -> (prefilling) -> ready
        self._last_rows = 0

    # -- the step -------------------------------------------------------------------------------

    def _lin(self, x: torch.Tensor, w: Any, k: int, **kw: Any) -> torch.Tensor:
        return self._ternary_linear(x, w, k, _path=self.policy.path(x.shape[0]), **kw)

    def _attend_decode(self, nb: int):
        cfg = self.cfg
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        slots, positions = self.slots_dev[:nb], self.row_pos[:nb]

        def attend(i: int, qkv: torch.Tensor, attn: torch.Tensor) -> None:
            kp, vp = self.k_pool[i], self.v_pool[i]
            dk.rope_append_attention(qkv, nq, nkv, hd, kp, vp, positions, slots, attn, self.attn_ws,
                                     self.cos_t, self.sin_t)

        return attend

    def _step(self, nb: int) -> None:
        """One decode step for the first nb rows of slots_dev (graph-capturable: no host work)."""
        slots = self.slots_dev[:nb]
        self.pos[self.scratch:].zero_()  # padding rows always compute at position 0 of the scratch slot
        torch.index_select(self.token, 0, slots, out=self.row_tokens[:nb])
        torch.index_select(self.pos, 0, slots, out=self.row_pos[:nb])
        dk.embedding(self.weights.embed, self.row_tokens[:nb], out=self.h[:nb])
        run_layers(self.weights, self.topk, self.h[:nb], self.qkv[:nb], self.attn[:nb], self.mlp[:nb],
                   self._attend_decode(nb), self._lin)
        run_head(self.weights, self.topk, self.h[:nb], self.logits[:nb], normed=self.normed[:nb], tensor_cores=True)
        dk.sample_batch(self.logits[:nb], self.seen, self.fparams, self.iparams, self.rng, self.pos, self.token,
                        slots=slots, advance=1)
        torch.index_select(self.token, 0, slots, out=self.out_tokens[:nb])

    def _capture_all(self) -> None:
        """Warm every bucket up eagerly first (sizes every shared workspace before any capture), then capture
        one graph per bucket. Warm-up rows all name the scratch slot."""
        dev = self.device
        self.slots_dev.fill_(self.scratch)
        torch.cuda.synchronize(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for nb in reversed(self.buckets):
                for _ in range(2):
                    self._step(nb)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        for nb in self.buckets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._step(nb)
            self.graphs[nb] = g
        torch.cuda.synchronize(dev)

    # -- the ModelRunner protocol ---------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be an integer in [0, {self.max_slots}), got {slot!r}")

    def _reset_slot(self, slot: int) -> None:
        self.seen[slot].zero_()
        self.pos[slot] = 0
        self.token[slot] = 0
        self.rng[slot].zero_()
        self._len[slot] = 0

    def begin(self, slot: int, settings: SamplingSettings, seed: int) -> None:
        self._check_slot(slot)
        self._reset_slot(slot)
        self.fparams[slot] = torch.tensor([settings.temperature, settings.top_p, settings.repetition_penalty],
                                          dtype=torch.float32)
        self.iparams[slot] = int(settings.top_k)
        self.rng[slot] = torch.tensor([_signed64(seed), 0], dtype=torch.int64)
        self._state[slot] = "begun"

    def _check_ids(self, ids: Sequence[int], room: int) -> torch.Tensor:
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError("prefill needs a non-empty list of token ids")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size})")
        if t.numel() > room:
            raise ValueError(f"{t.numel()} prompt tokens do not fit: the slot has {room} of {self.max_len} "
                             "positions left")
        return t

    def prefill(self, slot: int, ids: list[int], last: bool) -> int | None:
        self._check_slot(slot)
        if self._state[slot] not in ("begun", "prefilling"):
            raise RuntimeError(f"slot {slot} is {self._state[slot]}: call begin() before prefill()")
        t = self._check_ids(ids, self.max_len - self._len[slot])
        cfg, dev, n = self.cfg, self.device, t.numel()
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        ids_gpu = t.to(dev, torch.int32)
        start = self.pos[slot:slot + 1]  # the slot's filled positions: where this chunk starts

        def attend(i: int, qkv: torch.Tensor, attn: torch.Tensor) -> None:
            kc, vc = self.k_pool[i, slot], self.v_pool[i, slot]
            dk.rope_append(qkv, nq, nkv, hd, self.cos_t, self.sin_t, start, kc, vc)
            dk.attention(qkv, nq, nkv, hd, kc, vc, start, out=attn)

        try:
            h = dk.embedding(self.weights.embed, ids_gpu)
            qkv = torch.empty(n, cfg.q_size + 2 * cfg.kv_size, dtype=torch.float32, device=dev)
            attn = torch.empty(n, cfg.q_size, dtype=torch.float32, device=dev)
            mlp = torch.empty(n, cfg.intermediate_size, dtype=torch.float32, device=dev)
            run_layers(self.weights, self.topk, h, qkv, attn, mlp, attend, self._ternary_linear)
            if last:
                run_head(self.weights, self.topk, h[-1:], self.logits[:1], normed=self.normed[:1], tensor_cores=True)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise RuntimeError(f"CUDA out of memory during the prefill of {n} tokens; use shorter chunks") from None
        self.seen[slot].index_fill_(0, ids_gpu.long(), 1)
        self._len[slot] += n
        if not last:
            self.pos[slot:slot + 1].add_(n)
            self._state[slot] = "prefilling"
            return None
        dk.sample_batch(self.logits[:1], self.seen, self.fparams, self.iparams, self.rng, self.pos, self.token,
                        slots=self.slot_ids[slot:slot + 1], advance=n)
        self._state[slot] = "ready"
        self._last_rows = 1
        return int(self.token[slot].item())

    def decode(self, slots: list[int]) -> list[int]:
        slots = list(slots)
        if not slots:
            return []
        for s in slots:
            self._check_slot(s)
            if self._state[s] != "ready":
                raise RuntimeError(f"slot {s} has no finished prefill (state {self._state[s]})")
            if self._len[s] >= self.max_len:
                raise ValueError(f"slot {s} is full ({self.max_len} positions)")
        if len(set(slots)) != len(slots):
            raise ValueError(f"decode slots must be distinct, got {slots}")
        b = len(slots)
        nb = next(x for x in self.buckets if x >= b)
        rows = slots + [self.scratch] * (nb - b)
        self.slots_host[:nb] = torch.tensor(rows, dtype=torch.int32)
        self.slots_dev[:nb].copy_(self.slots_host[:nb], non_blocking=True)
        if self.use_graph:
            self.graphs[nb].replay()
        else:
            self._step(nb)
        self.tokens_host[:b].copy_(self.out_tokens[:b], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        for s in slots:
            self._len[s] += 1
        self._last_rows = b
        return self.tokens_host[:b].tolist()

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._state[slot] = "free"

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._len[slot]

    # -- inspection (tests, benchmarks) ---------------------------------------------------------

    def last_logits(self) -> torch.Tensor:
        """fp32 logits [B, V] (CPU) of the last decode step's rows, in the order of its slots list (after a
        final prefill chunk: [1, V], that chunk's last position)."""
        return self.logits[:self._last_rows].cpu()

    @property
    def memory(self) -> dict[str, int]:
        w = self.weights.weight_bytes
        return {"weights": w, "kv_pool": self.kv_bytes, "total": w + self.kv_bytes}
