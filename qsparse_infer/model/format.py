"""The engine file (format versions 1 and 2): one safetensors file that holds everything needed to run a model.

See docs/ARCHITECTURE.md for the layout. Version 2 adds the full-precision family (config.precision "bf16":
transposed float weights instead of packed ternary ones, q/k/v biases, RoPE scaling, the L2 re-scale flag,
distinct gate/up ratios); a file is written with the lowest version that can describe it, so ternary models
stay version 1 and older readers keep reading them. The writer is atomic (temp file + os.replace), and
`write_engine_stream` writes tensor by tensor (the converter of large checkpoints); the reader checks the
container before loading anything (so a truncated file gives a clear error, not a crash) and then validates
metadata, the tensor set, shapes, dtypes and scales against the config.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..packing import LAYOUT_CONCAT, LAYOUT_INTERLEAVE, packed_columns, unpack_ternary
from .config import ModelConfig, SparsityConfig, check_topk
from .head_int8 import Q8, Q8_SCALES

FORMAT_NAME = "qsparse-infer"
FORMAT_VERSION = 2  # the newest this code writes (only where a file needs it: required_version)
SUPPORTED_VERSIONS = (1, 2)
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
    """(input dim D, output segment sizes, layout) of one projection group. Ternary groups are packed
    (packing.py); full-precision groups are [D, sum(segments)] float matrices with the segments side by side
    (gate then up: "concat")."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    if group == "qkv":
        return h, [cfg.q_size, cfg.kv_size, cfg.kv_size], LAYOUT_CONCAT
    if group == "o":
        return cfg.q_size, [h], LAYOUT_CONCAT
    if group == "gate_up":
        return h, [m, m], LAYOUT_INTERLEAVE if cfg.precision == "ternary" else LAYOUT_CONCAT
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
            if cfg.precision == "ternary":
                out[p + group + ".packed"] = ((d, packed_columns(segs, layout) // 4), "packed")
                out[p + group + ".scales"] = ((len(segs),), "scales")
            else:  # rows = input channels: a kept channel reads one contiguous row
                out[p + group + ".weight_t"] = ((d, sum(segs)), "float")
        if cfg.attn_bias:
            out[p + "qkv.bias"] = ((cfg.q_size + 2 * cfg.kv_size,), "float")
    return out


def required_version(cfg: ModelConfig, sparsity: SparsityConfig) -> int:
    """The lowest format version that can describe this model: 2 for anything version 1 cannot say."""
    return 2 if cfg.needs_v2() or sparsity.up is not None else 1


def config_json(cfg: ModelConfig, version: int) -> str:
    """The config as a version-`version` file stores it (version 1: without the fields it does not know)."""
    return cfg.to_json() if version >= 2 else json.dumps(cfg.to_dict_v1(), sort_keys=True)


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
    special = info.get("special_tokens", {})
    if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in special.items()):
        raise EngineFormatError(f"tokenizer.special_tokens must map names to strings, got {special!r}")


def validate_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], has_tokenizer: bool) -> None:
    """Check the tensor set, shapes, dtypes and scales against the config; raise EngineFormatError."""
    expected = expected_tensors(cfg, has_tokenizer, int8_head=Q8 in tensors or Q8_SCALES in tensors)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise EngineFormatError(f"missing required tensors: {missing[:5]}{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise EngineFormatError(f"unexpected tensors (not part of the format for this config): "
                                f"{unexpected[:5]}")
    for name, (shape, kind) in expected.items():
        check_tensor(name, tensors[name], shape, kind)


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], kind: str) -> None:
    """One tensor against its expected shape and kind (expected_tensors); raise EngineFormatError."""
    if kind == "bytes":
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise EngineFormatError(f"tensor {name!r} must be 1-D uint8, got {t.dtype} {tuple(t.shape)}")
        return
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
    elif not bool(torch.isfinite(t).all()):
        raise EngineFormatError(f"tensor {name!r} contains NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def _metadata(config: ModelConfig, sparsity: SparsityConfig, info: dict[str, Any], source: str) -> dict[str, str]:
    version = required_version(config, sparsity)
    return {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "config": config_json(config, version),
        "sparsity": json.dumps(sparsity.to_dict(), sort_keys=True),
        "tokenizer": json.dumps(info, sort_keys=True),
        "source": source,
    }


def _tokenizer_info(tokenizer_info: dict[str, Any] | None) -> dict[str, Any]:
    info = dict(tokenizer_info or {"kind": "none"})
    info.setdefault("bos_id", None)
    info.setdefault("eos_ids", [])
    info.setdefault("pad_id", None)
    info.setdefault("chat_template", None)
    info.setdefault("special_tokens", {})
    return info


def write_engine(path: str | os.PathLike, config: ModelConfig, sparsity: SparsityConfig,
                 tensors: dict[str, torch.Tensor], tokenizer_info: dict[str, Any] | None = None,
                 tokenizer_bytes: bytes | None = None, source: str = "", overwrite: bool = True) -> Path:
    """Validate and write an engine file atomically. `tensors` excludes `tokenizer.bytes` (pass the bytes).
    overwrite=False fails with FileExistsError if `path` exists when the finished file is moved there."""
    path = Path(path)
    info = _tokenizer_info(tokenizer_info)
    all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if tokenizer_bytes is not None:
        all_tensors["tokenizer.bytes"] = torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8)
    validate_tokenizer_info(info, tokenizer_bytes is not None)
    validate_tensors(config, all_tensors, tokenizer_bytes is not None)
    check_topk(config, sparsity)
    metadata = _metadata(config, sparsity, info, source)
    if Q8 in all_tensors:
        metadata["lm_head"] = "int8"  # the tensors are the truth; this key makes the choice visible to tools
    return _atomic_write(path, overwrite, lambda f: write_safetensors(f, all_tensors, metadata))


def write_engine_stream(path: str | os.PathLike, config: ModelConfig, sparsity: SparsityConfig,
                        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        produce: Iterable[tuple[str, torch.Tensor]], tokenizer_info: dict[str, Any] | None = None,
                        tokenizer_bytes: bytes | None = None, source: str = "", overwrite: bool = True,
                        on_bytes: Callable[[int], None] | None = None) -> Path:
    """Write an engine file tensor by tensor, so that no more than one tensor is held at a time.

    `specs` names every tensor (tokenizer.bytes excluded) with its shape and dtype, in the order `produce` yields
    them; that order is the file's (it must not widen the element size: safetensors' data is unpadded, so wider
    tensors go first to stay aligned). The set is checked against the config before anything is written, each
    tensor against its spec (and for NaN / inf) as it arrives; any error removes the temp file, and the finished
    file is renamed into place as write_engine does. on_bytes(n) reports progress."""
    path = Path(path)
    info = _tokenizer_info(tokenizer_info)
    validate_tokenizer_info(info, tokenizer_bytes is not None)
    check_topk(config, sparsity)
    expected = expected_tensors(config, tokenizer_bytes is not None)
    expected.pop("tokenizer.bytes", None)
    if set(specs) != set(expected):
        missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
        raise EngineFormatError(f"tensor set does not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    sizes = []
    for name, (shape, dtype) in specs.items():
        want, kind = expected[name]
        if tuple(shape) != want:
            raise EngineFormatError(f"tensor {name!r} has shape {tuple(shape)}, expected {want} for this config")
        if kind == "float" and dtype not in FLOAT_DTYPES:
            raise EngineFormatError(f"tensor {name!r} must be float16, bfloat16 or float32, got {dtype}")
        sizes.append(torch.empty((), dtype=dtype).element_size())
    if any(b > a for a, b in zip(sizes, sizes[1:])):
        raise ValueError("write_engine_stream: specs must not widen the element size from one tensor to the next")
    metadata = _metadata(config, sparsity, info, source)
    header_specs = dict(specs)
    if tokenizer_bytes is not None:
        header_specs["tokenizer.bytes"] = ((len(tokenizer_bytes),), torch.uint8)

    def write(f) -> None:
        _write_header(f, header_specs, metadata)
        produced = iter(produce)
        for name, (shape, dtype) in specs.items():
            got = next(produced, None)
            if got is None or got[0] != name:
                raise ValueError(f"write_engine_stream: expected tensor {name!r} next, got "
                                 f"{None if got is None else got[0]!r}")
            t = got[1].detach().cpu().contiguous()
            if t.dtype != dtype:
                raise EngineFormatError(f"tensor {name!r} is {t.dtype}, but the file header says {dtype}")
            check_tensor(name, t, expected[name][0], expected[name][1])
            _write_data(f, t)
            if on_bytes is not None:
                on_bytes(t.numel() * t.element_size())
        if tokenizer_bytes is not None:
            f.write(tokenizer_bytes)

    return _atomic_write(path, overwrite, write)


def _atomic_write(path: Path, overwrite: bool, write: Callable[[Any], None]) -> Path:
    """Run write(f) on a temp file of our own beside `path`, fsync it and rename it into place; any error (and
    Ctrl-C, SIGTERM) removes the temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():
        raise EngineFormatError(f"{path} exists and is not a regular file; refusing to replace it")
    remove_stale_temps(path)
    # One temp file that we own (created with the umask's permissions, not mkstemp's 0600), written by our own
    # safetensors writer: safetensors' save_file would add a second temp file of its own beside it.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite and path.is_file():  # --force keeps the replaced file's permissions
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        _publish(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# safetensors dtype names; ordered writes (widest element first) keep every tensor aligned to its element size.
_ST_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.uint8: "U8",
              torch.int8: "I8", torch.bool: "BOOL"}


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream `tensors` into the open binary file f in the safetensors layout (8-byte header length, JSON
    header padded to 8 bytes, then the data), one tensor at a time."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    _write_header(f, {n: (tuple(tensors[n].shape), tensors[n].dtype) for n in order}, metadata)
    for name in order:
        _write_data(f, tensors[name])


def _write_header(f, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> None:
    """The safetensors header for tensors laid out in the order of `specs` (name -> (shape, dtype))."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def _write_data(f, t: torch.Tensor) -> None:
    t = t.contiguous().reshape(-1)
    if t.numel():
        f.write(t.view(torch.uint8).numpy().data)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to `path`. Without overwrite the move itself fails when `path` exists (a
    hard link never replaces), so two writers racing for one name cannot silently replace each other."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it") from None
    except OSError:  # a file system without hard links: check, then rename (not race-free there)
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of earlier writes to `path` whose process is gone (killed, e.g. by SIGKILL)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-[0-9a-f]{8}\.tmp")
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        m = pattern.fullmatch(tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def _check_regular_file(path: str | os.PathLike) -> Path:
    """The path as a Path if it names a regular file; else an error that says what it names instead."""
    if os.fspath(path) == "":
        raise FileNotFoundError("no engine file given (the path is empty)")
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"engine file not found: {path}") from None
    except OSError as e:  # a symlink loop, a path through a file, a name too long, no permission
        raise EngineFormatError(f"{path}: cannot open the engine file: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise EngineFormatError(f"{path} is a directory, not an engine file")
    if not stat.S_ISREG(st.st_mode):
        raise EngineFormatError(f"{path} is not a regular file, so it cannot be an engine file")
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the safetensors header without loading tensor data. Raises EngineFormatError for a
    file that is not safetensors or is truncated (data offsets beyond the end of the file)."""
    path = _check_regular_file(path)
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


_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class EngineMetadata:
    """What an engine file's header says, without its tensors (read_metadata)."""

    format_version: int
    config: ModelConfig
    sparsity: SparsityConfig
    tokenizer_info: dict[str, Any]
    source: str
    header: dict[str, Any] = field(repr=False)


def read_metadata(path: str | os.PathLike) -> EngineMetadata:
    """Parse and check the header and metadata of an engine file, reading no tensor data."""
    header = read_header(path)
    path = Path(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise EngineFormatError(f"{path}: corrupt safetensors metadata (not a JSON object)")
    if meta.get("format") != FORMAT_NAME:
        raise EngineFormatError(
            f"{path}: not a qsparse-infer engine file (metadata 'format' is {meta.get('format')!r}, expected "
            f"{FORMAT_NAME!r}); convert a checkpoint with `qsparse convert`")
    if "format_version" not in meta:
        raise EngineFormatError(f"{path}: metadata has no 'format_version' entry")
    try:
        version = int(meta["format_version"])
    except (TypeError, ValueError):
        raise EngineFormatError(f"{path}: bad format_version {meta.get('format_version')!r}") from None
    if version not in SUPPORTED_VERSIONS:
        raise EngineFormatError(
            f"{path}: unsupported format_version {version} (this qsparse-infer reads {list(SUPPORTED_VERSIONS)}); "
            f"re-convert the checkpoint with this version")
    cfg = _parse_meta(path, meta, "config", ModelConfig.from_dict)
    sparsity = _parse_meta(path, meta, "sparsity", SparsityConfig.from_dict)
    info = _parse_meta(path, meta, "tokenizer", lambda d: d)
    if required_version(cfg, sparsity) > version:
        raise EngineFormatError(f"{path}: format_version {version} cannot hold this config (precision "
                                f"{cfg.precision!r}, sparsity {sparsity.describe()}): it needs version "
                                f"{required_version(cfg, sparsity)}")
    return EngineMetadata(version, cfg, sparsity, info, meta.get("source", ""), header)


def read_engine(path: str | os.PathLike) -> EngineFile:
    """Read and fully validate an engine file. Tensors are returned on the CPU."""
    m = read_metadata(path)
    path, header, meta = Path(path), m.header, m.header.get("__metadata__") or {}
    version, cfg, sparsity, info = m.format_version, m.config, m.sparsity, m.tokenizer_info
    # Sizes the metadata claims are checked against the file before anything is built from them.
    has_tok = "tokenizer.bytes" in header
    file_layers = len({m.group(1) for m in map(_LAYER_RE.match, header) if m})
    if cfg.num_layers > file_layers:
        raise EngineFormatError(f"{path}: the config claims {cfg.num_layers} layers, but the file holds tensors "
                                f"for {file_layers}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except SafetensorError as e:
        raise EngineFormatError(f"{path}: corrupt safetensors file: {e}") from None
    try:
        validate_tokenizer_info(info, has_tok)
        validate_tensors(cfg, tensors, has_tok)
        if meta.get("lm_head", "float") != ("int8" if Q8 in tensors else "float"):
            raise EngineFormatError(f"metadata lm_head={meta.get('lm_head')!r} disagrees with the tensors "
                                    f"({Q8!r} {'present' if Q8 in tensors else 'absent'})")
        check_topk(cfg, sparsity)
    except (EngineFormatError, ValueError) as e:
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
    """The reference `Transformer` (CPU, fp32 norms/embeddings) holding the file's weights: unpacked ternary
    ones, or the full-precision ones widened to fp32."""
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
            if cfg.attn_bias:
                q_b, k_b, v_b = torch.split(t[p + "qkv.bias"].float(), [cfg.q_size, cfg.kv_size, cfg.kv_size])
                block.attn.q_bias.copy_(q_b)
                block.attn.k_bias.copy_(k_b)
                block.attn.v_bias.copy_(v_b)
            if cfg.precision != "ternary":
                for group, (members, _) in GROUPS.items():
                    _, segs, _ = group_geometry(cfg, group)
                    cols = torch.split(t[p + group + ".weight_t"], segs, dim=1)
                    for name, part in zip(members, cols):
                        mods[name].weight.copy_(part.t().float())
                continue
            for group, (members, _) in GROUPS.items():
                _, segs, layout = group_geometry(cfg, group)
                full = unpack_ternary(t[p + group + ".packed"], segs, layout)
                scales = t[p + group + ".scales"]
                for j, (name, part) in enumerate(zip(members, torch.split(full, segs, dim=0))):
                    mods[name].ternary.copy_(part)
                    mods[name].beta.fill_(float(scales[j]))
    return model.eval()
