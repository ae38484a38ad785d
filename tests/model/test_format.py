"""Engine file v1: round trip, and the reader's validation (each error names the problem)."""
from __future__ import annotations

import json

import pytest
import torch
from builders import engine_tensors, random_reference, sentencepiece_model, tiny_config
from safetensors.torch import save_file

from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import EngineFormatError, build_reference, expected_tensors, read_engine, write_engine

CFG = tiny_config(vocab_size=400, num_kv_heads=1, intermediate_size=80, num_layers=2)
INFO = {"kind": "sentencepiece", "bos_id": 1, "eos_ids": [2], "pad_id": None, "chat_template": None,
        "special_tokens": {"bos_token": "<s>"}}


@pytest.fixture(scope="module")
def model():
    return random_reference(CFG, seed=1)


@pytest.fixture
def good(tmp_path, model):
    path = tmp_path / "m.qsp"
    write_engine(path, CFG, SparsityConfig(attn=0.5, mlp=0.25), engine_tensors(model), INFO,
                 sentencepiece_model(), source="test")
    return path


def _raw(path, tensors, meta_overrides=None, drop_meta=()):
    """Write a safetensors file bypassing write_engine's validation."""
    meta = {"format": "qsparse-infer", "format_version": "1", "config": CFG.to_json(),
            "sparsity": json.dumps(SparsityConfig().to_dict()), "tokenizer": json.dumps({"kind": "none"}),
            "source": ""}
    meta.update(meta_overrides or {})
    for k in drop_meta:
        meta.pop(k)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_round_trip(good, model):
    ef = read_engine(good)
    assert ef.format_version == 1 and ef.config == CFG and ef.source == "test"
    assert ef.sparsity == SparsityConfig(attn=0.5, mlp=0.25)
    assert ef.tokenizer_bytes == sentencepiece_model() and ef.tokenizer_info == INFO
    want = engine_tensors(model)
    assert set(ef.tensors) == set(want)
    for k, v in want.items():
        assert torch.equal(ef.tensors[k], v), k
    assert set(ef.tensors) | {"tokenizer.bytes"} == set(expected_tensors(CFG, True))
    rebuilt = build_reference(ef, SparsityConfig())
    model.set_sparsity(SparsityConfig())
    ids = torch.tensor([5, 1, 399, 0, 17, 17, 3])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))


def test_truncated_file(good):
    data = good.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 200, 9, 4):
        good.write_bytes(data[:cut])
        with pytest.raises(EngineFormatError, match="truncated|not a safetensors"):
            read_engine(good)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.qsp"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(EngineFormatError, match="not a safetensors file"):
        read_engine(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_engine(tmp_path / "missing.qsp")


def test_wrong_format_and_version(tmp_path, model):
    t = engine_tensors(model)
    with pytest.raises(EngineFormatError, match="not a qsparse-infer engine file"):
        read_engine(_raw(tmp_path / "a", t, {"format": "pt"}))
    with pytest.raises(EngineFormatError, match="unsupported format_version 3"):
        read_engine(_raw(tmp_path / "b", t, {"format_version": "3"}))
    with pytest.raises(EngineFormatError, match="no 'config' entry"):
        read_engine(_raw(tmp_path / "c", t, drop_meta=("config",)))
    with pytest.raises(EngineFormatError, match="invalid 'config' metadata"):
        read_engine(_raw(tmp_path / "d", t, {"config": json.dumps({**CFG.to_dict(), "hidden_size": -1})}))


def test_missing_and_unexpected_tensor(tmp_path, model):
    t = engine_tensors(model)
    t.pop("layers.1.down.scales")
    with pytest.raises(EngineFormatError, match=r"missing required tensors: \['layers\.1\.down\.scales'\]"):
        read_engine(_raw(tmp_path / "a", t))
    t = engine_tensors(model)
    t["layers.0.extra"] = torch.zeros(3)
    with pytest.raises(EngineFormatError, match=r"unexpected tensors.*layers\.0\.extra"):
        read_engine(_raw(tmp_path / "b", t))


def test_bad_shape(tmp_path, model):
    t = engine_tensors(model)
    t["layers.0.qkv.packed"] = t["layers.0.qkv.packed"][:, :-1]
    with pytest.raises(EngineFormatError, match=r"'layers\.0\.qkv\.packed' has shape \(64, 31\), expected \(64, 32\)"):
        read_engine(_raw(tmp_path / "a", t))
    t = engine_tensors(model)
    t["embed_tokens"] = t["embed_tokens"][:-1]
    with pytest.raises(EngineFormatError, match=r"'embed_tokens' has shape \(399, 64\)"):
        read_engine(_raw(tmp_path / "b", t))


def test_bad_dtypes(tmp_path, model):
    cases = {"layers.1.gate_up.packed": (torch.int8, "must be uint8"),
             "layers.0.o.scales": (torch.float16, "must be float32"),
             "norm": (torch.int32, "must be float16, bfloat16 or float32")}
    for i, (name, (dtype, msg)) in enumerate(cases.items()):
        t = engine_tensors(model)
        t[name] = t[name].to(dtype)
        with pytest.raises(EngineFormatError, match=f"'{name}'.*{msg}"):
            read_engine(_raw(tmp_path / f"f{i}", t))


def test_bad_scales_and_codes(tmp_path, model):
    t = engine_tensors(model)
    t["layers.1.qkv.scales"][1] = float("nan")
    with pytest.raises(EngineFormatError, match=r"'layers\.1\.qkv\.scales' has non-finite"):
        read_engine(_raw(tmp_path / "a", t))
    t = engine_tensors(model)
    t["layers.0.down.packed"][3, 2] = 0b11000000
    with pytest.raises(EngineFormatError, match=r"'layers\.0\.down\.packed' contains the invalid 2-bit code 3"):
        read_engine(_raw(tmp_path / "b", t))


def test_tokenizer_metadata_checked(tmp_path, model):
    with pytest.raises(EngineFormatError, match="needs the tensor 'tokenizer.bytes'"):
        read_engine(_raw(tmp_path / "a", engine_tensors(model), {"tokenizer": json.dumps(INFO)}))


def test_writer_refuses_invalid_and_is_atomic(tmp_path, model, monkeypatch):
    t = engine_tensors(model)
    t.pop("norm")
    with pytest.raises(EngineFormatError, match="missing required tensors"):
        write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), t)
    assert list(tmp_path.iterdir()) == []
    import importlib

    fmt = importlib.import_module("qsparse_infer.model.format")

    def boom(f, tensors, metadata):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), engine_tensors(model))
    assert list(tmp_path.iterdir()) == []
