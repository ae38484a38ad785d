"""The GPU decoder: weights uploaded once, static buffers, a KV cache, batched prefill and a decode step
captured in one CUDA graph.

Decode step (one token, all through our kernels; decode_kernel="persistent" runs the layers below as one
persistent kernel instead, gpu/persistent.py, with the same bits; position, token and RNG step live in device buffers so
the captured graph replays step after step without any host work per layer):
  embedding -> per layer:
    ternary_linear(qkv, fused input RMSNorm) -> attention with RoPE + KV append fused in (batched split-K
    decode kernel with B = 1, slot 0; prefill uses rope_append and the causal kernel)
    -> ternary_linear(o, fused attn sub-norm, + residual)
    -> ternary_linear(gate_up, fused post-attention RMSNorm, GLU)
    -> ternary_linear(down, fused FFN sub-norm, + residual)
  -> LM head with the final RMSNorm fused -> sampling (advances position and RNG step).

KV cache dtype: bf16 by default. It halves the cache bytes read per token (at 2B4T shape and 4k
context the fp32 cache would be 630 MB vs 315 MB); K/V enter attention only through dot products and a
weighted sum, where bf16's 2^-9 relative rounding stays far below the int8 activation quantization the
model already applies. fp32 is available (kv_dtype=torch.float32) for exact comparisons with the reference.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..generate.sampling import SamplingSettings
from ..kernels import decode as dk
from ..model.config import ModelConfig, SparsityConfig
from ..model.reference import rope_cos_sin
from .weights import GpuWeights, TopK, decode_settings, host_weight_bytes, row_bytes, run_head, run_layers

__all__ = ["GpuModel", "DECODE_KERNELS"]

DECODE_KERNELS = ("multi", "persistent", "auto")


def _fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class GpuModel:
    """One sequence on one GPU. Public: prefill(ids, settings, seed) -> first token, step() -> next token,
    decode(n) (n steps without host syncs; tokens in .history), logits(ids), reset(), memory."""

    def __init__(self, ef: Any, sparsity: SparsityConfig | None = None, *, max_len: int | None = None,
                 kv_dtype: torch.dtype = torch.bfloat16, use_graph: bool = True,
                 device: str | torch.device = "cuda", decode_kernel: str = "multi") -> None:
        from ..kernels.linear import ternary_linear

        self._linear = ternary_linear
        cfg: ModelConfig = ef.config
        self.cfg = cfg
        self.sparsity = sparsity or ef.sparsity
        self.max_len, self.device = decode_settings(cfg, max_len, kv_dtype, device)
        self.kv_dtype = kv_dtype
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        weight_bytes = host_weight_bytes(ef)
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * self.max_len * cfg.head_dim * kv_dtype.itemsize
        with torch.cuda.device(self.device):
            free, _total = torch.cuda.mem_get_info()
        need = weight_bytes + kv_bytes
        if need > free:
            raise RuntimeError(f"not enough GPU memory to load the model: needs {_fmt_gib(need)} (weights "
                               f"{_fmt_gib(weight_bytes)} + KV cache {_fmt_gib(kv_bytes)} for {self.max_len} "
                               f"positions), {_fmt_gib(free)} free; lower max_len or free the GPU")
        try:
            self._upload(ef)
            self._allocate()
        except torch.cuda.OutOfMemoryError:
            self.__dict__.clear()
            torch.cuda.empty_cache()
            with torch.cuda.device(device):
                free_now, _ = torch.cuda.mem_get_info()
            raise RuntimeError(f"CUDA out of memory while loading the model: needs about {_fmt_gib(need)} "
                               f"(weights + KV cache) plus buffers, {_fmt_gib(free_now)} free") from None
        self._set_k()
        self.persistent: Any = None
        self._set_decode_kernel(decode_kernel)
        if use_graph:
            self._capture()
        self.reset()

    def _set_decode_kernel(self, name: str) -> None:
        """"multi": the step as a chain of per-op kernels; "persistent": its layers as one persistent kernel
        (gpu/persistent.py; bit-identical); "auto": persistent where supported."""
        if name not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {', '.join(DECODE_KERNELS)}, got {name!r}")
        from .persistent import PersistentStep, unsupported_reason

        why = unsupported_reason(self) if name != "multi" else None
        if name == "persistent" and why is not None:
            raise ValueError(why)
        self.persistent = PersistentStep(self) if name != "multi" and why is None else None
        self.decode_kernel = "persistent" if self.persistent is not None else "multi"

    # -- setup ----------------------------------------------------------------------------------

    def _upload(self, ef: Any) -> None:
        w = GpuWeights(ef, self.device)
        self.weights = w
        self.embed, self.head, self.final_norm, self.layers = w.embed, w.head, w.final_norm, w.layers
        self.head_q8, self.head_q8_scales = w.head_q8, w.head_q8_scales  # None unless the head is int8
        self.weight_bytes, self.packed_bytes = w.weight_bytes, w.packed_bytes
        self.head_bytes, self.embed_bytes = w.head_bytes, w.embed_bytes

    def _allocate(self) -> None:
        cfg, dev = self.cfg, self.device
        before = torch.cuda.memory_allocated(dev)
        f32, i32 = torch.float32, torch.int32
        kv_shape = (cfg.num_layers, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        self.k_cache = torch.zeros(kv_shape, dtype=self.kv_dtype, device=dev)
        self.v_cache = torch.zeros(kv_shape, dtype=self.kv_dtype, device=dev)
        self.kv_bytes = 2 * self.k_cache.numel() * self.k_cache.element_size()
        cos, sin = rope_cos_sin(torch.arange(self.max_len), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        half = cfg.head_dim // 2
        self.cos_t = cos[:, :half].contiguous().to(dev)
        self.sin_t = sin[:, :half].contiguous().to(dev)
        # decode state (device buffers the graph reads and writes)
        self.token = torch.zeros(1, dtype=i32, device=dev)
        self.pos = torch.zeros(1, dtype=i32, device=dev)
        self.rng = torch.zeros(2, dtype=torch.int64, device=dev)
        self.fparams = torch.tensor([0.0, 1.0, 1.0], dtype=f32, device=dev)
        self.iparams = torch.zeros(1, dtype=i32, device=dev)
        self.seen = torch.zeros(cfg.vocab_size, dtype=torch.uint8, device=dev)
        self.history = torch.full((self.max_len + 1,), -1, dtype=i32, device=dev)
        # decode activations
        qkv_n = cfg.q_size + 2 * cfg.kv_size
        self.h = torch.zeros(1, cfg.hidden_size, dtype=f32, device=dev)
        self.qkv = torch.zeros(1, qkv_n, dtype=f32, device=dev)
        self.attn = torch.zeros(1, cfg.q_size, dtype=f32, device=dev)
        self.mlp = torch.zeros(1, cfg.intermediate_size, dtype=f32, device=dev)
        self.normed = torch.zeros(1, cfg.hidden_size, dtype=f32, device=dev)
        self.logits_buf = torch.zeros(1, cfg.vocab_size, dtype=f32, device=dev)
        self.attn_ws = dk.AttentionWorkspace.create(1, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.max_len,
                                                    dev)
        self.slot0 = torch.zeros(1, dtype=i32, device=dev)  # the decode step's one row lives in cache slot 0
        self.buffer_bytes = torch.cuda.memory_allocated(dev) - before - self.kv_bytes
        self.length = 0  # host mirror of pos: positions filled in the KV cache

    def _set_k(self) -> None:
        k = TopK.of(self.cfg, self.sparsity)
        self.topk = k
        self.k_attn, self.k_o, self.k_mlp, self.k_down, self.k_head = k.attn, k.o, k.mlp, k.down, k.head

    @property
    def memory(self) -> dict[str, int]:
        """GPU bytes held: weights as uploaded, KV cache, other buffers."""
        return {"weights": self.weight_bytes, "kv_cache": self.kv_bytes, "buffers": self.buffer_bytes,
                "total": self.weight_bytes + self.kv_bytes + self.buffer_bytes}

    def bytes_per_token(self, context_len: int) -> dict[str, int]:
        """Bytes a decode step must read at this sparsity with `context_len` filled positions."""
        cfg = self.cfg
        rows = 0
        for L in self.layers:
            for g, k in (("qkv", self.k_attn), ("o", self.k_o), ("gate_up", self.k_mlp), ("down", self.k_down)):
                grp = getattr(L, g)
                if g == "gate_up" and not hasattr(grp, "packed"):  # gate and up may keep different counts
                    rows += (self.topk.mlp + self.topk.gate_up[-1] if isinstance(self.topk.gate_up, tuple)
                             else 2 * k) * grp.segment_sizes[0] * grp.weight_t.element_size()
                else:
                    rows += k * row_bytes(grp)
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context_len * self.k_cache.element_size()
        return {"weight_rows": rows, "lm_head": self.head_bytes, "kv_cache": kv, "total": rows + self.head_bytes + kv}

    # -- the forward pieces ---------------------------------------------------------------------

    def _layers(self, h: torch.Tensor, qkv: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor,
                decode: bool) -> None:
        """decode: one token at self.pos through the batched decode kernels (B = 1, the layer's cache is
        slot 0 of a one-slot cache); else T prompt tokens from self.pos through the prefill kernels."""
        cfg = self.cfg
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def attend(i: int, qkv: torch.Tensor, attn: torch.Tensor) -> None:
            kc, vc = self.k_cache[i], self.v_cache[i]
            if decode:
                dk.rope_append_attention(qkv, nq, nkv, hd, kc, vc, self.pos, self.slot0, attn, self.attn_ws,
                                         self.cos_t, self.sin_t)
            else:
                dk.rope_append(qkv, nq, nkv, hd, self.cos_t, self.sin_t, self.pos, kc, vc)
                dk.attention(qkv, nq, nkv, hd, kc, vc, self.pos, out=attn)

        run_layers(self.weights, self.topk, h, qkv, attn, mlp, attend, self._linear)

    def _head(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """Final RMSNorm + LM head for the rows of h [T, H] into out [T, V]."""
        run_head(self.weights, self.topk, h, out, normed=self.normed if h.shape[0] == 1 else None)

    def _decode_step(self) -> None:
        dk.embedding(self.embed, self.token, out=self.h)
        if self.persistent is not None:
            self.persistent.run()
        else:
            self._layers(self.h, self.qkv, self.attn, self.mlp, decode=True)
        self._head(self.h, self.logits_buf)
        dk.sample(self.logits_buf, self.seen, self.fparams, self.iparams, self.rng, self.pos, self.token,
                  self.history, advance=1)

    def _forward_prompt(self, ids_gpu: torch.Tensor) -> torch.Tensor:
        """Run T prompt tokens from the current position through the layers; returns h [T, H]."""
        cfg, t = self.cfg, ids_gpu.shape[0]
        h = dk.embedding(self.embed, ids_gpu)
        qkv = torch.empty(t, cfg.q_size + 2 * cfg.kv_size, dtype=torch.float32, device=self.device)
        attn = torch.empty(t, cfg.q_size, dtype=torch.float32, device=self.device)
        mlp = torch.empty(t, cfg.intermediate_size, dtype=torch.float32, device=self.device)
        self._layers(h, qkv, attn, mlp, decode=False)
        return h

    def _capture(self) -> None:
        """Warm up eagerly (sizes every workspace), then capture one decode step."""
        torch.cuda.synchronize(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.reset()
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step()
        torch.cuda.synchronize(self.device)
        self.graph = graph

    # -- public API -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the sequence (the KV cache contents beyond position 0 are never read again)."""
        self.pos.zero_()
        self.token.zero_()
        self.seen.zero_()
        self.history.fill_(-1)
        self.rng[1] = 0
        self.length = 0

    def check_ids(self, ids: Sequence[int] | torch.Tensor, room: int = 0) -> torch.Tensor:
        """Validate a prompt: 1-D integers in the vocabulary, leaving `room` positions free in the cache."""
        t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.int64)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise ValueError(f"token ids must be integers, got {t.dtype}")
        t = t.to("cpu", torch.int64)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if t.numel() + room > self.max_len:
            raise ValueError(f"prompt of {t.numel()} tokens is longer than the context allows "
                             f"({self.max_len} positions, {room} kept for generation)")
        return t

    def set_sampling(self, settings: SamplingSettings, seed: int) -> None:
        if settings.additive_penalties:  # the one-sequence sampler has no generated-token counts
            raise ValueError("presence/frequency penalties are served by the batched runner (qsparse serve, "
                             "Engine.generate on a list), not the single-sequence decoder")
        self.fparams.copy_(torch.tensor([settings.temperature, settings.top_p, settings.repetition_penalty],
                                        dtype=torch.float32))
        self.iparams.fill_(settings.top_k)
        self.rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))

    def prefill(self, ids: Sequence[int] | torch.Tensor, settings: SamplingSettings | None = None,
                seed: int = 0) -> int:
        """Start a new sequence: run the prompt through the batched path, sample the first token (host int)."""
        t = self.check_ids(ids)
        settings = settings or SamplingSettings(temperature=0.0)
        self.reset()
        self.set_sampling(settings, seed)
        ids_gpu = t.to(self.device, torch.int32)
        try:
            h = self._forward_prompt(ids_gpu)
            self._head(h[-1:], self.logits_buf)
        except torch.cuda.OutOfMemoryError:
            self.reset()
            torch.cuda.empty_cache()
            raise RuntimeError(f"CUDA out of memory during the prefill of {t.numel()} tokens; use a shorter "
                               "prompt") from None
        self.seen[ids_gpu.long()] = 1
        dk.sample(self.logits_buf, self.seen, self.fparams, self.iparams, self.rng, self.pos, self.token,
                  self.history, advance=t.numel())
        self.length = t.numel()
        return int(self.token.item())

    def _run_step(self) -> None:
        if self.length >= self.max_len:
            raise ValueError(f"the context of {self.max_len} positions is full")
        if self.use_graph and self.graph is not None:
            self.graph.replay()
        else:
            self._decode_step()
        self.length += 1

    def step(self) -> int:
        """Feed the last sampled token, return the next one (host int; one sync)."""
        self._run_step()
        return int(self.token.item())

    def decode(self, n: int) -> None:
        """n decode steps back to back without host syncs (tokens land in self.history)."""
        if self.length + n > self.max_len:
            raise ValueError(f"{n} more steps would overflow the context of {self.max_len} positions")
        for _ in range(n):
            self._run_step()

    def tokens(self) -> list[int]:
        """The sampled tokens so far (history[prompt_len .. length])."""
        hist = self.history.cpu().tolist()
        return [x for x in hist if x >= 0]

    @torch.no_grad()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Full-sequence forward on the GPU: fp32 logits [T, V] (on the CPU). Resets the sequence."""
        t = self.check_ids(ids)
        self.reset()
        try:
            h = self._forward_prompt(t.to(self.device, torch.int32))
            out = torch.empty(t.numel(), self.cfg.vocab_size, dtype=torch.float32, device=self.device)
            self._head(h, out)
            result = out.cpu()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise RuntimeError(f"CUDA out of memory computing logits for {t.numel()} tokens") from None
        finally:
            self.reset()
        return result

    def set_decode_kernel(self, name: str) -> None:
        """Switch the decode step's layers between "multi", "persistent" and "auto" (between sequences: a
        captured graph is captured again)."""
        if self.length:
            raise RuntimeError("switch the decode kernel between sequences (after reset or before prefill)")
        self._set_decode_kernel(name)
        if self.graph is not None:
            self.graph = None
            self._capture()
            self.reset()

    def set_graph(self, enabled: bool) -> None:
        """Use the captured graph (True) or the eager step (False) from the next step on; captures on demand
        (only between sequences: capture runs warm-up steps that reset the sequence)."""
        if enabled and self.graph is None:
            if self.length:
                raise RuntimeError("enable the graph between sequences (after reset or before prefill)")
            self._capture()
            self.reset()
        self.use_graph = enabled
