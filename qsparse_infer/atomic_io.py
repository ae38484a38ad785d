"""Atomic result files: write a temp file next to the target, then rename it over the target, so a run
killed mid-write leaves the previous file (or none), never half of one. Used by `qsparse bench` and the
scripts under bench/. (Engine files have their own writer in format.py, which also refuses to clobber.)"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any, *, indent: int = 1, sort_keys: bool = False,
               newline: bool = True) -> None:
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + ("\n" if newline else ""))
