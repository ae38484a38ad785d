"""GpuBatchRunner: the batched GPU decoder behind the server (the ModelRunner protocol, SERVING_API.md).

Memory: the weights (shared with a GpuModel when given an Engine that has one) and a KV pool
[L, S + 1, nkv, max_len, hd]: one slot per sequence plus a scratch slot that padding rows use.

The runner is asynchronous (ModelRunner.asynchronous): launch(plan) enqueues the step on the current CUDA
stream and returns; the step's sampled tokens (and logprobs, for the rows that ask) come back through pinned
memory and an event (serving/gpu_io.py), never a synchronising copy, and a decode row's input token is the
one its slot's last sample wrote on the device. The host tracks every slot's length from what it launched,
so it never reads device state to plan a step. begin() resets a slot with stream-ordered device work, after
whatever a previous occupant still has in flight there.

Pure decode step for B active slots: the host writes the slot ids into a static device buffer and replays the
CUDA graph of the smallest batch bucket >= B (1, 2, 4, ..., max_slots); the other rows of the bucket name
the scratch slot, whose position is reset to 0 at the start of every step, so they compute garbage at
position 0 of the scratch slot and never touch a real slot's cache or sampling state. Inside the graph:
gather each row's last token and position, embedding, per layer ternary_linear over the B rows (path by
batch size, see LinearPolicy), attention_decode with RoPE + KV append fused in (each row in its own slot), LM head over
the rows, and one batched sampling launch that advances each slot's position and RNG step.

Mixed step (prefill chunks of one or more prompts, with or without decode rows), run eagerly: the decode rows
and every chunk's tokens go through one T-row layer stack (every weight read once for all T rows); per layer
the decode rows attend with attention_decode as in the graph, and each chunk with the prefill kernels
(rope_append + causal attention) in its slot's view of the pool (k_pool[layer, slot] is a contiguous
[nkv, max_len, hd] cache), starting at the slot's current position, so chunked prefill continues where the
last chunk ended. The head runs on the rows that sample (the decode rows and each prompt's last row), then one
sampling launch. A row gets the same bits in either kind of step and whatever shares it (every ternary_linear
path gives a row the same bits, attention_decode is batch-invariant and the fused RoPE bit-identical to the
unfused one, lm_head_mma's rows are independent), so a greedy request answers the same tokens alone and among
many.
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
from . import logprobs as lp
from .gpu_io import StepOutputs, pinned, to_device, to_host
from .runner import PrefillChunk, StepPlan, check_plan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MARGIN = 512 * 2**20  # graphs, linear-kernel workspaces, allocator slack
PROMPT_LOGPROB_ROWS = 256  # prompt rows per head call when a chunk asks for prompt logprobs ([rows, V] fp32)


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
    GEMM (its skinny variant 2 up to 64 rows, the prefill variant 3 above: every weight row read once for all B
    rows, and for mixed steps with prompt chunks once per 64-128 rows).

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
        # per slot: seen (uint8) and generated-token counts (int32) over the vocabulary, scalars
        return slots * rows * 4 + (slots + 1) * (5 * c.vocab_size + 64)

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
        self.counts = torch.zeros(s1, cfg.vocab_size, dtype=i32, device=dev)  # generated tokens (penalties)
        self.penalties = torch.zeros(s1, 2, dtype=f32, device=dev)  # presence, frequency
        self.fparams = torch.tensor([[0.0, 1.0, 1.0]] * s1, dtype=f32, device=dev)  # greedy, no filters
        self.iparams = torch.zeros(s1, dtype=i32, device=dev)
        self.rng = torch.zeros(s1, 2, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(s1, dtype=i32, device=dev)
        self.token = torch.zeros(s1, dtype=i32, device=dev)
        # per-row buffers of a decode step (a bucket of nb rows uses the first nb)
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
        self._len = [0] * s1  # positions launched per slot (host-side: planning never reads the device)
        self._state = ["free"] * s1  # free -> begun -> (prefilling) -> ready
        self._logprobs: list[int | None] = [None] * s1  # per slot: alternatives per sampled token, or None
        self._last_logits: torch.Tensor | None = None

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
                        slots=slots, advance=1, counts=self.counts, penalties=self.penalties)
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

    asynchronous = True

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be an integer in [0, {self.max_slots}), got {slot!r}")

    def _reset_slot(self, slot: int) -> None:
        """Stream-ordered: runs after any step still in flight that touches the slot."""
        self.seen[slot].zero_()
        self.counts[slot].zero_()
        self.pos[slot] = 0
        self.token[slot] = 0
        self.rng[slot].zero_()
        self._len[slot] = 0

    def begin(self, slot: int, settings: SamplingSettings, seed: int, logprobs: int | None = None) -> None:
        self._check_slot(slot)
        self._reset_slot(slot)
        dev = self.device
        params = torch.tensor([settings.temperature, settings.top_p, settings.repetition_penalty,
                               settings.presence_penalty, settings.frequency_penalty], dtype=torch.float32)
        params = pinned(params).to(dev, non_blocking=True)
        self.fparams[slot].copy_(params[:3])
        self.penalties[slot].copy_(params[3:])
        self.iparams[slot:slot + 1].copy_(to_device([int(settings.top_k)], torch.int32, dev))
        self.rng[slot].copy_(to_device([_signed64(seed), 0], torch.int64, dev))
        self._logprobs[slot] = logprobs
        self._state[slot] = "begun"

    def _check_ids(self, ids: Sequence[int], room: int) -> None:
        if not ids:
            raise ValueError("prefill needs a non-empty list of token ids")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > room:
            raise ValueError(f"{len(ids)} prompt tokens do not fit: the slot has {room} of {self.max_len} "
                             "positions left")

    def _check_plan(self, plan: StepPlan) -> None:
        """Everything that can be wrong with a plan, before any work is enqueued."""
        check_plan(plan, self.max_slots)
        for c in plan.prefills:
            if self._state[c.slot] not in ("begun", "prefilling"):
                raise RuntimeError(f"slot {c.slot} is {self._state[c.slot]}: call begin() before prefill")
            self._check_ids(c.ids, self.max_len - self._len[c.slot])
            if c.targets and not (0 <= min(c.targets) and max(c.targets) < self.vocab_size):
                raise ValueError(f"prompt logprob targets must be in the vocabulary [0, {self.vocab_size})")
        for s in plan.decode:
            if self._state[s] != "ready":
                raise RuntimeError(f"slot {s} has no finished prefill (state {self._state[s]})")
            if self._len[s] >= self.max_len:
                raise ValueError(f"slot {s} is full ({self.max_len} positions)")

    def launch(self, plan: StepPlan) -> StepOutputs:
        """Enqueue one step (see the module docstring); returns its outputs' handle at once."""
        self._check_plan(plan)
        if not plan:
            return StepOutputs(0, 0, [])
        try:
            if plan.prefills:
                out = self._launch_mixed(plan)
            else:
                out = self._launch_decode(plan.decode)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            n = sum(len(c.ids) for c in plan.prefills)
            raise RuntimeError(f"CUDA out of memory in a step of {len(plan.decode)} decode rows and {n} prompt "
                               "tokens; use a smaller prefill chunk") from None
        for c in plan.prefills:
            self._len[c.slot] += len(c.ids)
            if c.sample:
                self._state[c.slot] = "ready"
            elif self._state[c.slot] == "begun":
                self._state[c.slot] = "prefilling"
        for s in plan.decode:
            self._len[s] += 1
        return out.record()

    def _gather_logprobs(self, out: StepOutputs, logits: torch.Tensor, tokens: torch.Tensor,
                         row_slots: list[int]) -> None:
        """Logprobs of the sampled rows whose slot asks for them (on the device, only those rows)."""
        rows = [r for r, s in enumerate(row_slots) if self._logprobs[s] is not None]
        if not rows:
            return
        ks = [self._logprobs[row_slots[r]] for r in rows]
        idx = to_device(rows, torch.int64, self.device)
        packed = lp.gather_logprobs(logits.index_select(0, idx), tokens.index_select(0, idx).long(), max(ks))
        out.logprob_rows, out.logprob_k, out.logprob_max_k = rows, ks, max(ks)
        out.logprobs = to_host(packed)

    def _launch_decode(self, slots: list[int]) -> StepOutputs:
        b = len(slots)
        nb = next(x for x in self.buckets if x >= b)
        rows = slots + [self.scratch] * (nb - b)
        self.slots_dev[:nb].copy_(pinned(torch.tensor(rows, dtype=torch.int32)), non_blocking=True)
        if self.use_graph:
            self.graphs[nb].replay()
        else:
            self._step(nb)
        out = StepOutputs(0, b, [])
        out.tokens = to_host(self.out_tokens[:b])
        self._gather_logprobs(out, self.logits[:b], self.out_tokens[:b], slots)
        self._last_logits = self.logits[:b]
        return out

    def _launch_mixed(self, plan: StepPlan) -> StepOutputs:
        cfg, dev = self.cfg, self.device
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dec, chunks = list(plan.decode), plan.prefills
        b = len(dec)
        starts, r = [], b  # row of each chunk's first token
        for c in chunks:
            starts.append(r)
            r += len(c.ids)
        t = r
        ids = torch.empty(t, dtype=torch.int32, device=dev)
        dec_slots = to_device(dec, torch.int32, dev) if b else None
        if b:
            torch.index_select(self.token, 0, dec_slots, out=ids[:b])
            dec_pos = self.pos.index_select(0, dec_slots)
        prompt_ids = [i for c in chunks for i in c.ids]
        ids[b:].copy_(to_device(prompt_ids, torch.int32, dev))

        # every chunk's attention in one launch per layer (variant 2's tiles over all of them: a 128-token chunk
        # alone fills only 40 CTAs), each query with the bits of its chunk alone
        chunk_plan = dk.plan_chunks([(a, len(c.ids), c.slot) for c, a in zip(chunks, starts)], nq, nkv, hd,
                                    self.max_len, dev) if chunks else None

        def attend(i: int, qkv: torch.Tensor, attn: torch.Tensor) -> None:
            if b:
                dk.rope_append_attention(qkv[:b], nq, nkv, hd, self.k_pool[i], self.v_pool[i], dec_pos, dec_slots,
                                         attn[:b], self.attn_ws, self.cos_t, self.sin_t)
            for c, a in zip(chunks, starts):
                n, kc, vc = len(c.ids), self.k_pool[i, c.slot], self.v_pool[i, c.slot]
                start = self.pos[c.slot:c.slot + 1]  # the slot's filled positions: where this chunk starts
                dk.rope_append(qkv[a:a + n], nq, nkv, hd, self.cos_t, self.sin_t, start, kc, vc)
            if chunk_plan is not None:
                dk.attention_chunks(qkv, self.k_pool[i], self.v_pool[i], self.pos, chunk_plan, out=attn)

        h = dk.embedding(self.weights.embed, ids)
        qkv = torch.empty(t, cfg.q_size + 2 * cfg.kv_size, dtype=torch.float32, device=dev)
        attn = torch.empty(t, cfg.q_size, dtype=torch.float32, device=dev)
        mlp = torch.empty(t, cfg.intermediate_size, dtype=torch.float32, device=dev)
        run_layers(self.weights, self.topk, h, qkv, attn, mlp, attend, self._lin)

        out = StepOutputs(len(chunks), b, [None] * len(chunks))
        for i, (c, a) in enumerate(zip(chunks, starts)):
            if c.targets:  # prompt logprobs: the head over the chunk's rows, a block at a time
                packed = []
                for r0 in range(0, len(c.targets), PROMPT_LOGPROB_ROWS):
                    r1 = min(len(c.targets), r0 + PROMPT_LOGPROB_ROWS)
                    lg = torch.empty(r1 - r0, cfg.vocab_size, dtype=torch.float32, device=dev)
                    run_head(self.weights, self.topk, h[a + r0:a + r1], lg, tensor_cores=True)
                    packed.append(lp.gather_logprobs(lg, to_device(c.targets[r0:r1], torch.int64, dev), c.top))
                out.prompt.append((i, list(c.targets), c.top, to_host(torch.cat(packed))))
            elif c.targets is not None:
                out.prompt.append((i, [], c.top, torch.empty(0, 1 + 2 * c.top)))
        # the chunks' positions after this step (a sampled row's position is advanced by the sampler) and their
        # prompt tokens for the repetition penalty, each in one launch
        self.pos.index_copy_(0, to_device([c.slot for c in chunks], torch.int64, dev),
                             to_device([self._len[c.slot] + len(c.ids) - int(c.sample) for c in chunks],
                                       torch.int32, dev))
        v = cfg.vocab_size
        self.seen.view(-1).index_fill_(0, to_device([c.slot * v + x for c in chunks for x in c.ids], torch.int64,
                                                    dev), 1)
        sel = list(range(b))
        sel_slots = list(dec)
        for i, (c, a) in enumerate(zip(chunks, starts)):
            if c.sample:
                out.chunk_row[i] = len(sel)
                sel.append(a + len(c.ids) - 1)
                sel_slots.append(c.slot)
        self._last_logits = None
        if sel:
            logits = torch.empty(len(sel), v, dtype=torch.float32, device=dev)
            run_head(self.weights, self.topk, h.index_select(0, to_device(sel, torch.int64, dev)), logits,
                     tensor_cores=True)
            slots_dev = to_device(sel_slots, torch.int32, dev)
            dk.sample_batch(logits, self.seen, self.fparams, self.iparams, self.rng, self.pos, self.token,
                            slots=slots_dev, advance=1, counts=self.counts, penalties=self.penalties)
            tokens = self.token.index_select(0, slots_dev)
            out.tokens = to_host(tokens)
            self._gather_logprobs(out, logits, tokens, sel_slots)
            self._last_logits = logits
        return out

    # -- synchronous helpers (tests, benchmarks) ------------------------------------------------

    def prefill(self, slot: int, ids: list[int], last: bool) -> int | None:
        """One prefill chunk as its own step, waited for: the sampled token after the last chunk (else None)."""
        return self.launch(StepPlan(prefills=[PrefillChunk(slot, list(ids), last)])).result().prefill_tokens[0]

    def decode(self, slots: list[int]) -> list[int]:
        """One decode step of these slots, waited for: their sampled tokens."""
        slots = list(slots)
        if not slots:
            return []
        return self.launch(StepPlan(decode=slots)).result().decode_tokens

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._state[slot] = "free"

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._len[slot]

    # -- inspection (tests, benchmarks) ---------------------------------------------------------

    def last_logits(self) -> torch.Tensor:
        """fp32 logits [R, V] (CPU) of the last step's sampled rows: its decode rows in the order of its slots
        list, then the last row of each chunk that sampled (after prefill(..., last=True) alone: [1, V])."""
        if self._last_logits is None:
            return torch.empty(0, self.vocab_size)
        return self._last_logits.to("cpu", copy=True)

    @property
    def memory(self) -> dict[str, int]:
        w = self.weights.weight_bytes
        return {"weights": w, "kv_pool": self.kv_bytes, "total": w + self.kv_bytes}
