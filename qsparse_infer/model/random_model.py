"""Random engine tensors of a given shape, for tests and `qsparse bench --shape` (ternary shapes, and
"llama8b-bf16": full-precision bf16 weights of Llama-3-8B's shape).

The packed groups are drawn directly as 2-bit codes (uniform over {-1, 0, +1}) on the target device, so a
2B-parameter benchmark model is generated on the GPU in a second instead of going through a 1 GB file.
Scales are ~1/sqrt(2D/3), which keeps the residual stream's scale roughly constant from layer to layer.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import torch

from ..packing import column_map
from .config import ModelConfig, SparsityConfig
from .format import group_geometry

SHAPES: dict[str, ModelConfig] = {
    # microsoft/bitnet-b1.58-2B-4T: ReLU²-GLU, sub-norms, tied bf16 embeddings
    "2b4t": ModelConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_layers=30, num_heads=20,
                        num_kv_heads=5, head_dim=128, max_seq_len=4096, rope_theta=500000.0, activation="relu2",
                        attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=True),
    # Llama-3-8B-like, untied
    "8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, max_seq_len=8192, rope_theta=500000.0, activation="silu",
                      attn_sub_norm=False, ffn_sub_norm=False, tie_word_embeddings=False),
    # Llama-3-70B-like, untied: ~17 GB packed ternary + 2.1 GB head + 2.1 GB embeddings, one H200
    "70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8, head_dim=128, max_seq_len=8192, rope_theta=500000.0, activation="silu",
                       attn_sub_norm=False, ffn_sub_norm=False, tie_word_embeddings=False),
}
# Llama-3-8B's shape with full-precision (bf16) weights (format v2): the issue-18 benchmark shape
SHAPES["llama8b-bf16"] = dataclasses.replace(SHAPES["8b"], precision="bf16")


def random_packed(d: int, segments: tuple[int, ...] | list[int], layout: str, gen: torch.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """uint8 [D, Npad/4] of uniform ternary codes; padding columns hold code 1 (weight 0)."""
    cmap = column_map(list(segments), layout)
    codes = torch.randint(0, 3, (d, cmap.numel()), generator=gen, device=device, dtype=torch.uint8)
    pad = (cmap < 0).to(device)
    if bool(pad.any()):
        codes[:, pad] = 1
    c = codes.view(d, -1, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()


def random_tensors(cfg: ModelConfig, *, seed: int = 0, device: torch.device | str = "cpu",
                   float_dtype: torch.dtype = torch.bfloat16, embed_std: float = 1.0) -> dict[str, torch.Tensor]:
    """Every tensor of an engine file (docs/ARCHITECTURE.md), random, on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    t: dict[str, torch.Tensor] = {}

    def normal(shape, std):
        return (torch.randn(shape, generator=gen, device=device) * std).to(float_dtype)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=gen, device=device)).to(float_dtype)

    h = cfg.hidden_size
    t["embed_tokens"] = normal((cfg.vocab_size, h), embed_std)
    t["norm"] = norm(h)
    if not cfg.tie_word_embeddings:
        t["lm_head"] = normal((cfg.vocab_size, h), embed_std)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        t[p + "input_norm"] = norm(h)
        t[p + "post_attn_norm"] = norm(h)
        if cfg.attn_sub_norm:
            t[p + "attn_sub_norm"] = norm(cfg.q_size)
        if cfg.ffn_sub_norm:
            t[p + "ffn_sub_norm"] = norm(cfg.intermediate_size)
        if cfg.attn_bias:
            t[p + "qkv.bias"] = normal((cfg.q_size + 2 * cfg.kv_size,), 0.02)
        for g in ("qkv", "o", "gate_up", "down"):
            d, segs, layout = group_geometry(cfg, g)
            if cfg.precision != "ternary":  # bf16 rows: N(0, 1/D) keeps the residual stream's scale
                t[p + g + ".weight_t"] = normal((d, sum(segs)), 1.0 / math.sqrt(d))
                continue
            t[p + g + ".packed"] = random_packed(d, segs, layout, gen, device)
            base = 1.0 / math.sqrt(2.0 * d / 3.0)
            t[p + g + ".scales"] = (base * (0.8 + 0.4 * torch.rand(len(segs), generator=gen, device=device))).float()
    return t


def random_engine(cfg: ModelConfig, sparsity: SparsityConfig | None = None, **kw) -> SimpleNamespace:
    """An EngineFile-like object (config, sparsity, tensors, no tokenizer) with random tensors."""
    return SimpleNamespace(format_version=1 if cfg.precision == "ternary" else 2, config=cfg, sparsity=sparsity or SparsityConfig(),
                           tokenizer_info={"kind": "none"}, tokenizer_bytes=None, tensors=random_tensors(cfg, **kw),
                           source="random")
