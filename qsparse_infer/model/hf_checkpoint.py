"""Read access to a Hugging Face checkpoint folder: config.json and one or several safetensors shards.

Shared by `qsparse convert` (convert/) and `qsparse train --init-from` (train/), which both read such folders.
Tensor data is read with plain positioned reads into freshly allocated memory instead of through safetensors'
memory map: pages of a mapped 16 GB checkpoint count toward the process's resident set for as long as the map
lives, while a read leaves only the one tensor the caller holds (the converter streams tensor by tensor and
keeps its peak RSS near the largest tensor). safetensors itself still opens every shard once, to check its
header, so a corrupt shard is named before anything is read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

# safetensors dtype names this reader turns into torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class CheckpointError(ValueError):
    """The checkpoint folder cannot be read as asked; the message names the file or tensor."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when the file is absent or holds no object)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


class _Shard:
    """One safetensors file: its header (checked by safetensors), read with os.pread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:  # validates the header; reads no data
                names = list(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.entries = {name: header[name] for name in names}

    def spec(self, name: str) -> tuple[tuple[int, ...], str]:
        e = self.entries[name]
        return tuple(int(x) for x in e["shape"]), e["dtype"]

    def read(self, name: str) -> torch.Tensor:
        shape, st_dtype = self.spec(name)
        if st_dtype not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {st_dtype}, which is not supported "
                                  f"(supported: {', '.join(ST_DTYPES)})")
        start, end = self.entries[name]["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            view = memoryview(buf)
            while view:
                got = f.readinto(view)
                if not got:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                view = view[got:]
        dtype = ST_DTYPES[st_dtype]
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class Checkpoint:
    """Lazy, name-addressed access to the tensors of one or several safetensors files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._shards: dict[Path, _Shard] = {}
        index = folder / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
            for name, fname in weight_map.items():
                path = folder / fname
                if not path.is_file():
                    raise CheckpointError(f"shard {fname} named in {index.name} is missing")
                self.where[name] = path
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weights found in {folder}")
            for path in files:
                for name in self._shard(path).entries:
                    self.where[name] = path
        for path in sorted(set(self.where.values())):  # every shard's header, before any data is read
            shard = self._shard(path)
            listed = [n for n, p in self.where.items() if p == path and n not in shard.entries]
            if listed:
                raise CheckpointError(f"{path.name} lacks tensor {listed[0]!r} that "
                                      f"model.safetensors.index.json places there")
        self.used: set[str] = set()

    def _shard(self, path: Path) -> _Shard:
        if path not in self._shards:
            self._shards[path] = _Shard(path)
        return self._shards[path]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) of a tensor, without reading it."""
        if name not in self.where:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return self._shard(self.where[name]).spec(name)

    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        total = 0
        for name, path in self.where.items():
            e = self._shard(path).entries[name]
            total += e["data_offsets"][1] - e["data_offsets"][0]
        return total

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        self.used.add(name)
        return self._shard(self.where[name]).read(name)
