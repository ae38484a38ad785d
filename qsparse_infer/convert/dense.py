"""`qsparse convert` for the full-precision families (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
a Hugging Face folder -> a format-version-2 engine file whose weights stay in bf16 (or the --dtype asked for).

Streams tensor by tensor: the file's header is computed from config.json and the checkpoint's headers, then
each engine tensor is read from its shard(s), checked (shape, float dtype, finite), transposed into the
engine's layout (rows = input channels: torch's [out, in] Linear weight, transposed; q|k|v and gate|up side by
side), written and dropped. Peak memory is about three times the largest tensor (the embedding, or one
layer's gate and up), whatever the model's size; a progress bar counts the bytes written.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..model.config import ModelConfig, SparsityConfig
from ..model.format import GROUPS, group_geometry, write_engine_stream
from ..model.hf_checkpoint import ST_DTYPES, Checkpoint, CheckpointError
from ..model.hf_dense import read_dense_config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROLE_OF = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """torch Linear shapes [out, in] of the checkpoint's projections."""
    h, q, kv, m = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (m, h), "up": (m, h), "down": (h, m)}


def engine_specs(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every engine tensor of the model in file order (one dtype for all: no alignment gaps)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"embed_tokens": ((v, h), dtype), "norm": ((h,), dtype)}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((v, h), dtype)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs[p + "input_norm"] = ((h,), dtype)
        specs[p + "post_attn_norm"] = ((h,), dtype)
        for group in GROUPS:
            d, segs, _ = group_geometry(cfg, group)
            specs[p + group + ".weight_t"] = ((d, sum(segs)), dtype)
            if group == "qkv" and cfg.attn_bias:
                specs[p + "qkv.bias"] = ((sum(segs),), dtype)
    return specs


class _Reader:
    """Checked reads of the checkpoint's tensors, cast to the file's dtype."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str], dtype: torch.dtype) -> None:
        self.ckpt, self.names, self.dtype = ckpt, names, dtype

    def check_header(self, role: str, shape: tuple[int, ...], i: int | None = None) -> None:
        """Shape and dtype from the shard header alone (so a mismatch is found before anything is written)."""
        name = self.names[role].format(i=i)
        got, st_dtype = self.ckpt.spec(name)
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {got}, but the config implies {shape}")
        if ST_DTYPES.get(st_dtype) not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {st_dtype}; expected a float tensor (F32, F16, BF16)")

    def get(self, role: str, i: int | None = None) -> torch.Tensor:
        name = self.names[role].format(i=i)
        t = self.ckpt.get(name)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name!r} contains NaN or infinite values")
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor {name!r} overflows {self.dtype} (values beyond its range); choose a "
                                      f"wider --dtype")
        return t


def _produce(reader: _Reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The engine tensors in engine_specs' order, one at a time."""
    yield "embed_tokens", reader.get("embed")
    yield "norm", reader.get("norm")
    if not cfg.tie_word_embeddings:
        yield "lm_head", reader.get("lm_head")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        yield p + "input_norm", reader.get("input_norm", i)
        yield p + "post_attn_norm", reader.get("post_attn_norm", i)
        for group, roles in ROLE_OF.items():
            parts = [reader.get(r, i) for r in roles]
            w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            del parts
            yield p + group + ".weight_t", w.t().contiguous()
            del w
            if group == "qkv" and cfg.attn_bias:
                yield p + "qkv.bias", torch.cat([reader.get(r + "_bias", i) for r in roles])


def convert_dense(src: Path, dst: Path, hf: dict[str, Any], arch: str, ckpt: Checkpoint,
                  sparsity: SparsityConfig | None, dtype: torch.dtype | None, topk_rescale: str | None,
                  progress: bool, force: bool, read_tokenizer: Callable[[int], tuple[dict[str, Any], bytes | None]],
                  source: str, recorded_sparsity: SparsityConfig | None) -> Path:
    """Write the engine file for one full-precision checkpoint (convert() has checked the destination;
    read_tokenizer(vocab_size) reads the folder's tokenizer files)."""
    from tqdm.auto import tqdm

    try:
        layout = read_dense_config(hf, arch, ckpt.__contains__)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    cfg = layout.config
    if topk_rescale is not None:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "topk_rescale": topk_rescale})
    for note in layout.notes:
        warnings.warn(note)
    sp = sparsity or recorded_sparsity or SparsityConfig()
    dtype = dtype or torch.bfloat16  # the family's weights stay bf16 unless asked otherwise
    reader = _Reader(ckpt, layout.names, dtype)
    shapes = _shapes(cfg)
    reader.check_header("embed", (cfg.vocab_size, cfg.hidden_size))
    reader.check_header("norm", (cfg.hidden_size,))
    if not cfg.tie_word_embeddings:
        reader.check_header("lm_head", (cfg.vocab_size, cfg.hidden_size))
    for i in range(cfg.num_layers):
        reader.check_header("input_norm", (cfg.hidden_size,), i)
        reader.check_header("post_attn_norm", (cfg.hidden_size,), i)
        for role, shape in shapes.items():
            reader.check_header(role, shape, i)
        if cfg.attn_bias:
            for r in ("q", "k", "v"):
                reader.check_header(r + "_bias", (shapes[r][0],), i)
    used = {n.format(i=i) for n in layout.names.values() for i in range(cfg.num_layers)}
    unused = sorted(n for n in ckpt.where if n not in used and not n.endswith("rotary_emb.inv_freq")
                    and not (n == layout.names["lm_head"] and cfg.tie_word_embeddings))
    if unused:
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        warnings.warn(f"{len(unused)} checkpoint tensors are not used by the converted model: {unused[:8]}{more}")
    specs = engine_specs(cfg, dtype)
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs.values())
    disable = not progress or not sys.stderr.isatty()
    info, tok_bytes = read_tokenizer(cfg.vocab_size)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"converting {arch}",
              disable=disable) as bar:
        return write_engine_stream(dst, cfg, sp, specs, _produce(reader, cfg), info, tok_bytes, source,
                                   overwrite=force, on_bytes=bar.update)
