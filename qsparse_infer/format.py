"""The engine file (format version 1): one safetensors file that holds everything needed to run a model.

See docs/ARCHITECTURE.md for the layout. The writer is atomic (temp file + os.replace); the reader checks
the container before loading anything (so a truncated file gives a clear error, not a crash) and then
validates metadata, the tensor set, shapes, dtypes and scales against the config.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, SparsityConfig
from .head_int8 import Q8, Q8_SCALES
from .quant import LAYOUT_CONCAT, LAYOUT_INTERLEAVE, packed_columns, unpack_ternary

FORMAT_NAME = "qsparse-infer"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TOKENIZER_KINDS = ("sentencepiece", "hf_json", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A safetensors header bigger than this is not a real header (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

# Packed projection groups: name -> (member projections, layout). Segment sizes come from the config.
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "qkv": (("q", "k", "v"), LAYOUT_CONCAT),
    "o": (("o",), LAYOUT_CONCAT),
    "gate_up": (("gate", "up"), LAYOUT_INTERLEAVE),
    "down": (("down",), LAYOUT_CONCAT),
}


class EngineFormatError(ValueError):
    """The file is not a valid engine file; the message names what is wrong."""


def group_geometry(cfg: ModelConfig, group: str) -> tuple[int, list[int], str]:
    """(input dim D, output segment sizes, layout) of one packed projection group."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    if group == "qkv":
        return h, [cfg.q_size, cfg.kv_size, cfg.kv_size], LAYOUT_CONCAT
    if group == "o":
        return cfg.q_size, [h], LAYOUT_CONCAT
    if group == "gate_up":
        return h, [m, m], LAYOUT_INTERLEAVE
    if group == "down":
        return m, [h], LAYOUT_CONCAT
    raise KeyError(f"unknown projection group {group!r}")


def expected_tensors(cfg: ModelConfig, has_tokenizer: bool,
                     int8_head: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a valid file holds: name -> (shape, kind) with kind in {float, packed, scales, bytes, q8,
    head_scales}. (The tokenizer's byte length is free, so its shape is given as (-1,).)"""
    h, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[tuple[int, ...], str]] = {"embed_tokens": ((v, h), "float"), "norm": ((h,), "float")}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ((v, h), "float")
    if int8_head:  # optional (head_int8.py); the float head/embedding stays
        out[Q8] = ((v, h), "q8")
        out[Q8_SCALES] = ((v,), "head_scales")
    if has_tokenizer:
        out["tokenizer.bytes"] = ((-1,), "bytes")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "input_norm"] = ((h,), "float")
        out[p + "post_attn_norm"] = ((h,), "float")
        if cfg.attn_sub_norm:
            out[p + "attn_sub_norm"] = ((cfg.q_size,), "float")
        if cfg.ffn_sub_norm:
            out[p + "ffn_sub_norm"] = ((cfg.intermediate_size,), "float")
        for group in GROUPS:
            d, segs, layout = group_geometry(cfg, group)
            out[p + group + ".packed"] = ((d, packed_columns(segs, layout) // 4), "packed")
            out[p + group + ".scales"] = ((len(segs),), "scales")
    return out


@dataclass
class EngineFile:
    format_version: int
    config: ModelConfig
    sparsity: SparsityConfig
    tokenizer_info: dict[str, Any]
    tokenizer_bytes: bytes | None
    tensors: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------
# Validation (shared by the writer, so a bad file is never written, and the reader)
# ---------------------------------------------------------------------------------------------


def validate_tokenizer_info(info: dict[str, Any], has_bytes: bool) -> None:
    if not isinstance(info, dict):
        raise EngineFormatError(f"tokenizer metadata must be a JSON object, got {type(info).__name__}")
    kind = info.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise EngineFormatError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if (kind != "none") != has_bytes:
        raise EngineFormatError(
            f"tokenizer kind {kind!r} " + ("needs the tensor 'tokenizer.bytes'" if kind != "none"
                                           else "must not come with a 'tokenizer.bytes' tensor"))
    for key in ("bos_id", "pad_id"):
        if info.get(key) is not None and not isinstance(info[key], int):
            raise EngineFormatError(f"tokenizer.{key} must be an integer or null, got {info[key]!r}")
    eos = info.get("eos_ids", [])
    if not isinstance(eos, list) or not all(isinstance(e, int) for e in eos):
        raise EngineFormatError(f"tokenizer.eos_ids must be a list of integers, got {eos!r}")
    if info.get("chat_template") is not None and not isinstance(info["chat_template"], str):
        raise EngineFormatError("tokenizer.chat_template must be a string or null")


def validate_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], has_tokenizer: bool) -> None:
    """Check the tensor set, shapes, dtypes and scales against the config; raise EngineFormatError."""
    expected = expected_tensors(cfg, has_tokenizer, int8_head=Q8 in tensors or Q8_SCALES in tensors)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise EngineFormatError(f"missing required tensors: {missing[:5]}{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise EngineFormatError(f"unexpected tensors (not part of format v{FORMAT_VERSION} for this config): "
                                f"{unexpected[:5]}")
    for name, (shape, kind) in expected.items():
        t = tensors[name]
        if kind == "bytes":
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise EngineFormatError(f"tensor {name!r} must be 1-D uint8, got {t.dtype} {tuple(t.shape)}")
            continue
        if tuple(t.shape) != shape:
            raise EngineFormatError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} for this config")
        if kind == "packed":
            if t.dtype != torch.uint8:
                raise EngineFormatError(f"tensor {name!r} must be uint8 (packed ternary), got {t.dtype}")
            # Code 3 is not a ternary value: bits (2j, 2j+1) both set in some 2-bit lane.
            if bool(((t & (t >> 1)) & 0x55).any()):
                raise EngineFormatError(f"tensor {name!r} contains the invalid 2-bit code 3 (corrupt data)")
        elif kind == "scales":
            if t.dtype != torch.float32:
                raise EngineFormatError(f"tensor {name!r} (weight scales) must be float32, got {t.dtype}")
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise EngineFormatError(f"tensor {name!r} has non-finite or non-positive scales: {t.tolist()}")
        elif kind == "q8":
            if t.dtype != torch.int8:
                raise EngineFormatError(f"tensor {name!r} (int8 head) must be int8, got {t.dtype}")
            if bool((t == -128).any()):
                raise EngineFormatError(f"tensor {name!r} holds -128; the int8 head's values lie in [-127, 127]")
        elif kind == "head_scales":
            if t.dtype != torch.float32:
                raise EngineFormatError(f"tensor {name!r} (int8 head scales) must be float32, got {t.dtype}")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise EngineFormatError(f"tensor {name!r} has non-finite or negative scales")
        elif t.dtype not in FLOAT_DTYPES:
            raise EngineFormatError(f"tensor {name!r} must be float16, bfloat16 or float32, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def write_engine(path: str | os.PathLike, config: ModelConfig, sparsity: SparsityConfig,
                 tensors: dict[str, torch.Tensor], tokenizer_info: dict[str, Any] | None = None,
                 tokenizer_bytes: bytes | None = None, source: str = "") -> Path:
    """Validate and write an engine file atomically. `tensors` excludes `tokenizer.bytes` (pass the bytes)."""
    path = Path(path)
    info = dict(tokenizer_info or {"kind": "none"})
    info.setdefault("bos_id", None)
    info.setdefault("eos_ids", [])
    info.setdefault("pad_id", None)
    info.setdefault("chat_template", None)
    info.setdefault("special_tokens", {})
    all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if tokenizer_bytes is not None:
        all_tensors["tokenizer.bytes"] = torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8)
    validate_tokenizer_info(info, tokenizer_bytes is not None)
    validate_tensors(config, all_tensors, tokenizer_bytes is not None)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "sparsity": json.dumps(sparsity.to_dict(), sort_keys=True),
        "tokenizer": json.dumps(info, sort_keys=True),
        "source": source,
    }
    if Q8 in all_tensors:
        metadata["lm_head"] = "int8"  # the tensors are the truth; this key makes the choice visible to tools
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(all_tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the safetensors header without loading tensor data. Raises EngineFormatError for a
    file that is not safetensors or is truncated (data offsets beyond the end of the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"engine file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EngineFormatError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EngineFormatError(
                f"{path}: not a safetensors file or truncated: header claims {n} bytes, file has {size - 8} after "
                f"the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineFormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise EngineFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise EngineFormatError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
        if offsets[1] > data_size or offsets[0] > offsets[1]:
            raise EngineFormatError(
                f"{path}: truncated file: tensor {name!r} needs data bytes {offsets[0]}..{offsets[1]} but the file "
                f"holds only {data_size} data bytes")
    return header


def read_engine(path: str | os.PathLike) -> EngineFile:
    """Read and fully validate an engine file. Tensors are returned on the CPU."""
    path = Path(path)
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise EngineFormatError(f"{path}: corrupt safetensors metadata (not a JSON object)")
    if meta.get("format") != FORMAT_NAME:
        raise EngineFormatError(
            f"{path}: not a qsparse-infer engine file (metadata 'format' is {meta.get('format')!r}, expected "
            f"{FORMAT_NAME!r}); convert a checkpoint with `qsparse convert`")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise EngineFormatError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version not in SUPPORTED_VERSIONS:
        raise EngineFormatError(
            f"{path}: unsupported format_version {version} (this qsparse-infer reads {list(SUPPORTED_VERSIONS)}); "
            f"re-convert the checkpoint with this version")
    cfg = _parse_meta(path, meta, "config", ModelConfig.from_dict)
    sparsity = _parse_meta(path, meta, "sparsity", SparsityConfig.from_dict)
    info = _parse_meta(path, meta, "tokenizer", lambda d: d)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    has_tok = "tokenizer.bytes" in tensors
    try:
        validate_tokenizer_info(info, has_tok)
        validate_tensors(cfg, tensors, has_tok)
        if meta.get("lm_head", "float") != ("int8" if Q8 in tensors else "float"):
            raise EngineFormatError(f"metadata lm_head={meta.get('lm_head')!r} disagrees with the tensors "
                                    f"({Q8!r} {'present' if Q8 in tensors else 'absent'})")
    except EngineFormatError as e:
        raise EngineFormatError(f"{path}: {e}") from None
    tok_bytes = tensors.pop("tokenizer.bytes").numpy().tobytes() if has_tok else None
    return EngineFile(version, cfg, sparsity, info, tok_bytes, tensors, meta.get("source", ""))


def _parse_meta(path: Path, meta: dict[str, str], key: str, build):
    if key not in meta:
        raise EngineFormatError(f"{path}: metadata has no {key!r} entry")
    try:
        return build(json.loads(meta[key]))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise EngineFormatError(f"{path}: invalid {key!r} metadata: {e}") from None


# ---------------------------------------------------------------------------------------------
# Engine file -> reference model
# ---------------------------------------------------------------------------------------------


def build_reference(ef: EngineFile, sparsity: SparsityConfig | None = None):
    """The reference `Transformer` (CPU, fp32 norms/embeddings) holding the file's unpacked ternary weights."""
    from .reference import Transformer

    cfg = ef.config
    model = Transformer(cfg, sparsity or ef.sparsity)
    t = ef.tensors
    with torch.no_grad():
        model.embed.copy_(t["embed_tokens"].float())
        model.norm.weight.copy_(t["norm"].float())
        if model.lm_head is not None:
            model.lm_head.copy_(t["lm_head"].float())
        if Q8 in t:
            model.set_int8_head(t[Q8], t[Q8_SCALES])
        for i, block in enumerate(model.layers):
            p = f"layers.{i}."
            block.input_norm.weight.copy_(t[p + "input_norm"].float())
            block.post_attn_norm.weight.copy_(t[p + "post_attn_norm"].float())
            if block.attn.sub_norm is not None:
                block.attn.sub_norm.weight.copy_(t[p + "attn_sub_norm"].float())
            if block.mlp.sub_norm is not None:
                block.mlp.sub_norm.weight.copy_(t[p + "ffn_sub_norm"].float())
            mods = {"q": block.attn.q, "k": block.attn.k, "v": block.attn.v, "o": block.attn.o,
                    "gate": block.mlp.gate, "up": block.mlp.up, "down": block.mlp.down}
            for group, (members, _) in GROUPS.items():
                _, segs, layout = group_geometry(cfg, group)
                full = unpack_ternary(t[p + group + ".packed"], segs, layout)
                scales = t[p + group + ".scales"]
                for j, (name, part) in enumerate(zip(members, torch.split(full, segs, dim=0))):
                    mods[name].ternary.copy_(part)
                    mods[name].beta.fill_(float(scales[j]))
    return model.eval()
