"""What the single-sequence decoder (gpu_model.GpuModel) and the batched one (serving/gpu_runner.py) share:
the weights as uploaded to the GPU, the top-K counts of a sparsity setting, and the layer stack / LM head
written once over "rows" (tokens of one prompt, or one token of each sequence in a batch).

How a layer's attention reads and writes its KV cache is the caller's business (one cache, or a pool of
slots), so run_layers takes it as a callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..kernels import decode as dk
from ..model.config import ModelConfig, SparsityConfig, topk_count
from ..model.format import group_geometry
from ..model.head_int8 import Q8, Q8_SCALES
from ..model.quant import topk_mask


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn_sub_norm: torch.Tensor | None
    ffn_sub_norm: torch.Tensor | None
    qkv: Any
    o: Any
    gate_up: Any
    down: Any


def decode_settings(cfg: ModelConfig, max_len: int | None, kv_dtype: torch.dtype,
                    device: str | torch.device) -> tuple[int, torch.device]:
    """Validate what both GPU decoders take (positions per sequence, KV dtype, what the attention kernels
    support) and resolve the device to an indexed CUDA device. Returns (max_len, device)."""
    max_len = int(max_len or cfg.max_seq_len)
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if kv_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"kv_dtype must be torch.bfloat16 or torch.float32, got {kv_dtype}")
    if cfg.head_dim > 128 or cfg.num_heads // cfg.num_kv_heads > 8:
        raise ValueError("the GPU attention kernels support head_dim <= 128 and <= 8 query heads per kv head")
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return max_len, device


def file_tensors(ef: Any) -> dict[str, torch.Tensor]:
    """The engine file's model tensors (the tokenizer blob stays on the host)."""
    return {k: v for k, v in ef.tensors.items() if k != "tokenizer.bytes"}


def host_weight_bytes(ef: Any) -> int:
    """Bytes the weights will take on the GPU (as stored in the file)."""
    return sum(t.numel() * t.element_size() for t in file_tensors(ef).values() if not t.is_cuda)


class GpuWeights:
    """The model's weights on one GPU: embedding, head, final norm, and per layer the norms and the four
    projection groups: packed ternary ones (linear_kernels.PackedTernary), or for a full-precision model bf16
    ones (kernels/dense.py's DenseWeight, with the q/k/v bias and the re-scale rule). With an int8 head in the file (head_int8.py), head_q8
    and head_q8_scales replace the float head, which is then not uploaded unless tied (the embedding lookup
    needs the table)."""

    def __init__(self, ef: Any, device: torch.device) -> None:
        from ..kernels.linear import PackedTernary

        cfg: ModelConfig = ef.config
        self.cfg, self.device = cfg, device
        t, dev = file_tensors(ef), device

        def norm(name: str) -> torch.Tensor:
            return t[name].to(device=dev, dtype=torch.float32).contiguous()

        self.embed = t["embed_tokens"].to(dev).contiguous()
        self.head_q8 = t[Q8].to(dev).contiguous() if Q8 in t else None
        self.head_q8_scales = t[Q8_SCALES].to(dev, torch.float32).contiguous() if Q8 in t else None
        if cfg.tie_word_embeddings:
            self.head = self.embed
        else:
            self.head = t["lm_head"].to(dev).contiguous() if self.head_q8 is None else None
        self.final_norm = norm("norm")
        self.dense = cfg.precision != "ternary"  # full precision: kernels/dense.py's DenseWeight groups
        self.layers: list[Layer] = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            groups = {}
            for g in ("qkv", "o", "gate_up", "down"):
                _, segs, layout = group_geometry(cfg, g)
                if self.dense:
                    from ..kernels.dense import DenseWeight

                    bias = t.get(p + "qkv.bias") if g == "qkv" else None
                    groups[g] = DenseWeight.from_cpu(t[p + g + ".weight_t"], segs, bias, cfg.topk_rescale, dev)
                    continue
                groups[g] = PackedTernary(t[p + g + ".packed"].to(dev).contiguous(),
                                          t[p + g + ".scales"].to(device=dev, dtype=torch.float32).contiguous(),
                                          segs, layout)
            self.layers.append(Layer(
                norm(p + "input_norm"), norm(p + "post_attn_norm"),
                norm(p + "attn_sub_norm") if cfg.attn_sub_norm else None,
                norm(p + "ffn_sub_norm") if cfg.ffn_sub_norm else None, **groups))
        held = [self.embed, self.final_norm] + ([] if cfg.tie_word_embeddings or self.head is None else [self.head])
        if self.head_q8 is not None:
            held += [self.head_q8, self.head_q8_scales]
        for L in self.layers:
            held += [x for x in (L.input_norm, L.post_norm, L.attn_sub_norm, L.ffn_sub_norm) if x is not None]
            for g in (L.qkv, L.o, L.gate_up, L.down):
                held += group_tensors(g)
        self.weight_bytes = sum(x.numel() * x.element_size() for x in held)  # as held on the GPU
        # what a decode step must read at S = 0 from weights: packed (or bf16) rows + head (+ one embedding row)
        self.packed_bytes = sum(row_bytes(getattr(L, g)) * getattr(L, g).in_features for L in self.layers
                                for g in ("qkv", "o", "gate_up", "down"))
        if self.head_q8 is not None:
            self.head_bytes = self.head_q8.numel() + 4 * self.head_q8_scales.numel()
        else:
            self.head_bytes = self.head.numel() * self.head.element_size()
        self.embed_bytes = self.embed.numel() * self.embed.element_size()


def group_tensors(g: Any) -> list[torch.Tensor]:
    """The GPU tensors of one projection group (ternary PackedTernary or full-precision DenseWeight)."""
    if hasattr(g, "packed"):
        return [g.packed, g.scales, g.colinfo]
    return [g.weight_t] + ([g.bias] if g.bias is not None else [])


def row_bytes(g: Any) -> int:
    """Bytes of one input channel's row of a projection group."""
    if hasattr(g, "packed"):
        return int(g.packed.shape[1])
    return g.out_features * g.weight_t.element_size()


@dataclass(frozen=True)
class TopK:
    """Channels kept per projection input (k_head = hidden size: a dense head; up = the up projection's, which
    equals mlp, the gate's, unless the sparsity sets them apart)."""

    attn: int
    o: int
    mlp: int
    down: int
    head: int
    up: int = -1  # -1: as mlp

    @property
    def gate_up(self) -> int | tuple[int, int]:
        """The k argument of the gate | up projection: one k, or (k_gate, k_up) when they differ."""
        return self.mlp if self.up in (-1, self.mlp) else (self.mlp, self.up)

    @classmethod
    def of(cls, cfg: ModelConfig, s: SparsityConfig) -> "TopK":
        k = cls(topk_count(cfg.hidden_size, s.attn), topk_count(cfg.q_size, s.o), topk_count(cfg.hidden_size, s.mlp),
                topk_count(cfg.intermediate_size, s.down),
                topk_count(cfg.hidden_size, s.lm_head) if s.lm_head > 0 else cfg.hidden_size,
                topk_count(cfg.hidden_size, s.up_ratio))
        for name in ("attn", "o", "mlp", "down", "head", "up"):
            if getattr(k, name) < 1:
                raise ValueError(f"sparsity {s.describe()} keeps no channel (k_{name} = 0)")
        return k


# attend(layer index, layer, qkv rows) -> rotate q/k, append K/V to the cache, write attention into `attn`
Attend = Callable[[int, torch.Tensor, torch.Tensor], None]


def run_layers(w: GpuWeights, k: TopK, h: torch.Tensor, qkv: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor,
               attend: Attend, lin: Callable[..., torch.Tensor]) -> None:
    """The layer stack over the rows of h [T, H] (updated in place). lin: linear_kernels.ternary_linear or a
    wrapper of it that picks the path; full-precision weights always run kernels/dense.py's dense_linear (which
    picks its own path), whatever `lin` is."""
    eps, glu = w.cfg.rms_norm_eps, w.cfg.activation
    if w.dense:
        from ..kernels.dense import dense_linear as lin
    for i, L in enumerate(w.layers):
        lin(h, L.qkv, k.attn, norm_weight=L.input_norm, norm_eps=eps, out=qkv)
        attend(i, qkv, attn)
        lin(attn, L.o, k.o, norm_weight=L.attn_sub_norm, norm_eps=eps, residual=h, out=h)
        lin(h, L.gate_up, k.gate_up, norm_weight=L.post_norm, norm_eps=eps, glu=glu, out=mlp)
        lin(mlp, L.down, k.down, norm_weight=L.ffn_sub_norm, norm_eps=eps, residual=h, out=h)


def run_head(w: GpuWeights, k: TopK, h: torch.Tensor, out: torch.Tensor, normed: torch.Tensor | None = None,
             tensor_cores: bool = False) -> None:
    """Final RMSNorm + LM head for the rows of h [T, H] into out [T, V] (normed: optional [T, H] scratch).
    tensor_cores: the bf16 head runs lm_head_mma where it can (batched decode; see head_gemv)."""
    eps = w.cfg.rms_norm_eps
    if k.head < w.cfg.hidden_size:  # top-K masked head input (dense weights)
        normed = dk.rmsnorm(h, w.final_norm, eps, out=normed)
        normed.mul_(topk_mask(normed, k.head))
        head_gemv(w, normed, None, out, tensor_cores)
    else:
        head_gemv(w, h, w.final_norm, out, tensor_cores)


def head_gemv(w: GpuWeights, x: torch.Tensor, norm_weight: torch.Tensor | None, out: torch.Tensor,
              tensor_cores: bool = False) -> None:
    """logits = head(RMSNorm(x) * norm_weight, or x when norm_weight is None), int8 or float head.
    tensor_cores: a bf16 head with H % 128 == 0 runs on tensor cores (dk.lm_head_mma: one pass over the head
    for any number of rows; within ~1e-5 of the CUDA-core head, so a decoder uses one of them for every row
    count to keep a row's logits independent of its batch)."""
    eps = w.cfg.rms_norm_eps
    if w.head_q8 is not None:
        dk.lm_head_int8(x, w.head_q8, w.head_q8_scales, norm_weight=norm_weight, eps=eps, out=out)
    elif tensor_cores and dk.lm_head_mma_supported(w.head):
        dk.lm_head_mma(x, w.head, norm_weight=norm_weight, eps=eps, out=out)
    else:
        dk.lm_head(x, w.head, norm_weight=norm_weight, eps=eps, out=out)
