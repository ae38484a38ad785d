"""Result files are replaced atomically: new content in full, or the old file untouched, and no temp left."""
from __future__ import annotations

import json

import pytest

from qsparse_infer import atomic_io


def test_write_json_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_io.write_json(path, {"a": 1})
    atomic_io.write_json(path, {"b": [2, 3]}, indent=2, sort_keys=True)
    assert json.loads(path.read_text()) == {"b": [2, 3]} and path.read_text().endswith("\n")
    atomic_io.write_json(path, {"c": 4}, newline=False)
    assert path.read_text() == '{\n "c": 4\n}'
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    atomic_io.write_text(path, "old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_io.write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
