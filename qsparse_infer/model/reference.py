"""The reference model: pure PyTorch, fp32 math, CPU or GPU. It is the spec the CUDA engine must match.

A Llama-style pre-norm decoder: RMSNorm, GQA attention with half-split ("rotate_half") RoPE (optionally scaled
as Llama 3 or linearly), optional q/k/v biases (Qwen2), optional attention/FFN sub-norms (BitNet b1.58),
ReLU²-GLU or SiLU-GLU, tied or untied LM head. Every projection has its group's top-K sparsity on its input: a
BitLinear (quant.bitlinear) for precision "ternary", a full-precision product (quant.dense_linear, with the
optional L2 re-scale) for "bf16". The projection class is pluggable, so the training tool runs this same
architecture with latent weights and straight-through estimators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, SparsityConfig, topk_count
from .head_int8 import int8_head_logits
from .quant import bitlinear, dense_linear, topk_mask

# Projection name -> sparsity group whose ratio applies to its input ("up" is the gate's unless set apart).
PROJ_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}


def proj_ratio(sparsity: SparsityConfig, proj: str) -> float:
    """The sparsity ratio of one projection's input."""
    return sparsity.up_ratio if proj == "up" else getattr(sparsity, PROJ_GROUP[proj])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class TernaryLinear(nn.Module):
    """Inference BitLinear: fixed ternary weights [out, in] (int8) and one fp32 scale beta."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("ternary", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("beta", torch.ones((), dtype=torch.float32))
        self.k = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, self.ternary, self.beta, self.k)


class DenseLinear(nn.Module):
    """Inference full-precision projection: weight [out, in] (fp32 here; bf16 in the file, widened exactly),
    top-K on the input, optional L2 re-scale (quant.dense_linear). Biases live in Attention, not here."""

    def __init__(self, in_features: int, out_features: int, rescale: str = "none") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float32))
        self.rescale = rescale
        self.k = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.k, rescale=self.rescale)


LinearFactory = Callable[[int, int], nn.Module]


def default_linear(cfg: ModelConfig) -> LinearFactory:
    """The inference projection class of a config's precision."""
    if cfg.precision == "ternary":
        return TernaryLinear
    return lambda d_in, d_out: DenseLinear(d_in, d_out, cfg.topk_rescale)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] (fp32), as transformers computes them:
    default: theta^(-2i/hd); "linear": divided by factor; "llama3": wavelengths 2π/f longer than
    original_max / low_freq_factor divided by factor, shorter than original_max / high_freq_factor kept, and in
    between a blend: (1 - a) f / factor + a f with a = (original_max / wavelength - low) / (high - low)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    a = (old / wavelen - low) / (high - low)
    blended = (1 - a) * scaled / factor + a * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for the half-split layout, computed in fp32 as transformers does."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; rotate_half pairs channel i with i + head_dim/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class KVCache:
    """Per-layer keys/values [num_kv_heads, max_len, head_dim] and the number of filled positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, max_len: int, device: torch.device | str = "cpu") -> "KVCache":
        shape = (cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, device=device) for _ in range(cfg.num_layers)],
                   [torch.zeros(shape, device=device) for _ in range(cfg.num_layers)])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = make_linear(cfg.hidden_size, cfg.q_size)
        self.k = make_linear(cfg.hidden_size, cfg.kv_size)
        self.v = make_linear(cfg.hidden_size, cfg.kv_size)
        self.o = make_linear(cfg.q_size, cfg.hidden_size)
        self.sub_norm = RMSNorm(cfg.q_size, cfg.rms_norm_eps) if cfg.attn_sub_norm else None
        if cfg.attn_bias:  # Qwen2: added after the (sparse) product, never sparsified
            self.q_bias = nn.Parameter(torch.zeros(cfg.q_size))
            self.k_bias = nn.Parameter(torch.zeros(cfg.kv_size))
            self.v_bias = nn.Parameter(torch.zeros(cfg.kv_size))
        else:
            self.q_bias = self.k_bias = self.v_bias = None

    def _proj(self, lin: nn.Module, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        y = lin(x)
        return y if bias is None else y + bias.float()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        out = self.attend(self._proj(self.q, self.q_bias, x), self._proj(self.k, self.k_bias, x),
                          self._proj(self.v, self.v_bias, x), cos, sin, cache, layer, start)
        if self.sub_norm is not None:
            out = self.sub_norm(out)
        return self.o(out)

    def forward_segments(self, x: torch.Tensor, segs: list[tuple[int, KVCache]],
                         rope: tuple[torch.Tensor, torch.Tensor], layer: int) -> torch.Tensor:
        """Rows of several sequences stacked in x [T, H]: segment i is segs[i][0] consecutive rows of the
        sequence whose cache is segs[i][1], starting at position cache.length; rope = the stacked (cos, sin)
        [T, head_dim] of every row's position. Projections and RoPE run over all rows at once (row-wise
        and element-wise, so each row gets what `forward` gives it), cache append and attention per segment."""
        cfg, t = self.cfg, x.shape[0]
        cos, sin = rope
        q = apply_rope(self._proj(self.q, self.q_bias, x).view(t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(self._proj(self.k, self.k_bias, x).view(t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = self._proj(self.v, self.v_bias, x).view(t, cfg.num_kv_heads, cfg.head_dim)
        outs, r = [], 0
        for n, cache in segs:
            outs.append(self._attend_rotated(q[r:r + n], k[r:r + n], v[r:r + n], cache, layer, cache.length))
            r += n
        out = torch.cat(outs)
        if self.sub_norm is not None:
            out = self.sub_norm(out)
        return self.o(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        """RoPE, KV-cache append and causal attention for the projected rows of one sequence -> [T, q_size]."""
        cfg, t = self.cfg, q.shape[0]
        q = apply_rope(q.view(t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        return self._attend_rotated(q, k, v.view(t, cfg.num_kv_heads, cfg.head_dim), cache, layer, start)

    def _attend_rotated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
                        start: int) -> torch.Tensor:
        """q [T, heads, hd] and k [T, kv heads, hd] rotated, v [T, kv heads, hd] -> attention [T, q_size]."""
        cfg, t = self.cfg, q.shape[0]
        if cache is not None:
            cache.k[layer][:, start:start + t] = k.transpose(0, 1)
            cache.v[layer][:, start:start + t] = v.transpose(0, 1)
            k_all, v_all = cache.k[layer][:, :start + t], cache.v[layer][:, :start + t]
        else:
            k_all, v_all = k.transpose(0, 1), v.transpose(0, 1)
        group = cfg.num_heads // cfg.num_kv_heads
        k_all = k_all.repeat_interleave(group, dim=0)  # [heads, S, hd]
        v_all = v_all.repeat_interleave(group, dim=0)
        scores = torch.einsum("thd,hsd->hts", q, k_all) / math.sqrt(cfg.head_dim)
        if t > 1:  # one query sees every key up to its own position: nothing to mask (same values, fewer ops)
            q_pos = torch.arange(start, start + t, device=q.device)[:, None]
            k_pos = torch.arange(k_all.shape[1], device=q.device)[None, :]
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        return torch.einsum("hts,hsd->thd", scores.softmax(dim=-1), v_all).reshape(t, cfg.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory) -> None:
        super().__init__()
        self.gate = make_linear(cfg.hidden_size, cfg.intermediate_size)
        self.up = make_linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = make_linear(cfg.intermediate_size, cfg.hidden_size)
        self.sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.ffn_sub_norm else None
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = glu(self.gate(x), self.up(x), self.activation)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.down(h)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu2":
        return F.relu(gate).square() * up
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, make_linear)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, make_linear)

    def forward(self, h, cos, sin, cache, layer, start):
        h = h + self.attn(self.input_norm(h), cos, sin, cache, layer, start)
        return h + self.mlp(self.post_attn_norm(h))

    def forward_segments(self, h: torch.Tensor, segs: list[tuple[int, KVCache]],
                         rope: tuple[torch.Tensor, torch.Tensor], layer: int) -> torch.Tensor:
        h = h + self.attn.forward_segments(self.input_norm(h), segs, rope, layer)
        return h + self.mlp(self.post_attn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, sparsity: SparsityConfig | None = None,
                 make_linear: LinearFactory | None = None) -> None:
        super().__init__()
        make_linear = make_linear or default_linear(cfg)
        self.cfg = cfg
        self.embed = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList([Block(cfg, make_linear) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size))
        # the opt-in int8 head (head_int8.py), used instead of the float one when set; buffers follow .to()
        self.register_buffer("head_q8", None, persistent=False)
        self.register_buffer("head_q8_scales", None, persistent=False)
        self.sparsity = SparsityConfig()
        self.set_sparsity(sparsity or SparsityConfig())

    def projections(self):
        """Yield (layer index, projection name, module) for every BitLinear."""
        for i, block in enumerate(self.layers):
            for name in ("q", "k", "v", "o"):
                yield i, name, getattr(block.attn, name)
            for name in ("gate", "up", "down"):
                yield i, name, getattr(block.mlp, name)

    def set_sparsity(self, sparsity: SparsityConfig) -> None:
        self.sparsity = sparsity
        for _, name, lin in self.projections():
            lin.k = topk_count(lin.in_features, proj_ratio(sparsity, name))

    def set_int8_head(self, q: torch.Tensor | None, scales: torch.Tensor | None) -> None:
        """Use the int8 head Q [V, H] int8 with per-row scales [V] (None, None: back to the float head)."""
        if q is not None:
            want = (self.cfg.vocab_size, self.cfg.hidden_size)
            if q.dtype != torch.int8 or tuple(q.shape) != want or scales is None or tuple(scales.shape) != want[:1]:
                raise ValueError(f"int8 head must be int8 {want} with scales [{want[0]}]")
            scales = scales.to(torch.float32)
        self.head_q8, self.head_q8_scales = q, scales

    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """ids [T] -> fp32 logits [T, vocab]. With a cache, positions start at `start` and the cache grows."""
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        t = ids.shape[0]
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context of {self.cfg.max_seq_len}")
        positions = torch.arange(start, start + t, device=ids.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        h = self.embed[ids].float()
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, cache, i, start)
        if cache is not None:
            cache.length = start + t
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm (+ the head's top-K mask) and LM head: hidden rows [T, H] -> fp32 logits [T, V]."""
        h = self.norm(h)
        if self.sparsity.lm_head > 0:
            h = h * topk_mask(h, topk_count(h.shape[-1], self.sparsity.lm_head))
        if self.head_q8 is not None:
            return int8_head_logits(h, self.head_q8, self.head_q8_scales)
        return h @ self.head_weight().float().t()

    def forward_segments(self, segments: list[tuple[torch.Tensor, KVCache]]) -> list[torch.Tensor]:
        """Several sequences in one forward: segments[i] = (ids [n_i], the sequence's cache); its tokens go at
        positions cache.length .. + n_i (each cache grows by n_i; the caches must be distinct). Returns each
        segment's fp32 logits [n_i, vocab]: a prefill chunk and one-token decode rows of other sequences can
        share one call.

        Segment i's logits equal forward(ids_i, cache_i, cache_i.length) bit for bit: the projections' int8 x
        ternary sums are exact in any order, the norms, quantization and top-K work per row, RoPE tables are
        computed per segment by forward's call and applied element-wise, attention runs per segment with
        forward's ops, and the head runs per segment (a float matmul's rounding may depend on its row count)."""
        if len({id(c) for _, c in segments}) != len(segments):
            raise ValueError("each segment needs its own cache")
        for ids, c in segments:
            if ids.dim() != 1 or ids.numel() == 0:
                raise ValueError(f"segment ids must be non-empty and 1-D, got shape {tuple(ids.shape)}")
            if c.length + ids.numel() > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {c.length + ids.numel()} tokens exceeds the context of "
                                 f"{self.cfg.max_seq_len}")
        ids = torch.cat([i for i, _ in segments])
        tables = [rope_cos_sin(torch.arange(c.length, c.length + i.numel(), device=ids.device), self.cfg.head_dim,
                               self.cfg.rope_theta, self.cfg.rope_scaling) for i, c in segments]
        rope = (torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables]))
        segs = [(i.numel(), c) for i, c in segments]
        h = self.embed[ids].float()
        for li, block in enumerate(self.layers):
            h = block.forward_segments(h, segs, rope, li)
        out, r = [], 0
        for n, c in segs:
            c.length += n
            out.append(self.head(h[r:r + n].clone()))
            r += n
        return out

    def forward_rows(self, ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step for B sequences: ids [B], row b the next token of the sequence whose cache is
        caches[b] -> fp32 logits [B, vocab], row b bit-identical to forward(ids[b:b+1], caches[b], ...)."""
        if ids.dim() != 1 or ids.shape[0] != len(caches):
            raise ValueError(f"ids must be 1-D with one id per cache, got {tuple(ids.shape)} for {len(caches)}")
        return torch.cat(self.forward_segments([(ids[b:b + 1], c) for b, c in enumerate(caches)]))
