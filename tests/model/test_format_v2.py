"""Engine file v2 (the full-precision family) and the version rules: ternary files stay version 1 (what older
readers read), anything version 1 cannot describe is version 2, and the streaming writer checks every tensor and
leaves nothing behind on an error."""
from __future__ import annotations

import json
import math

import pytest
import torch
from builders import engine_tensors, random_reference, tiny_config
from safetensors import safe_open

from qsparse_infer import Engine
from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.model.format import (EngineFormatError, read_engine, read_metadata, required_version, write_engine,
                                        write_engine_stream)
from qsparse_infer.model.random_model import SHAPES, random_engine, random_tensors

pytestmark = pytest.mark.filterwarnings("ignore:.*CPU")

DENSE = tiny_config(vocab_size=120, precision="bf16", activation="silu", attn_sub_norm=False, ffn_sub_norm=False,
                    attn_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_ternary_files_stay_version_1_without_v2_keys(tmp_path):
    cfg = tiny_config()
    write_engine(tmp_path / "t.qsp", cfg, SparsityConfig.uniform(0.5), engine_tensors(random_reference(cfg)))
    meta = _meta(tmp_path / "t.qsp")
    assert meta["format_version"] == "1"
    assert not {"precision", "attn_bias", "rope_scaling", "topk_rescale"} & set(json.loads(meta["config"]))
    assert "up" not in json.loads(meta["sparsity"])
    assert read_engine(tmp_path / "t.qsp").config == cfg


def test_dense_round_trip_is_version_2(tmp_path):
    sp = SparsityConfig.parse("attn=0.5,gate=0.6,up=0.4,down=0.3")
    t = random_tensors(DENSE, seed=3, float_dtype=torch.bfloat16)
    write_engine(tmp_path / "d.qsp", DENSE, sp, t)
    ef = read_engine(tmp_path / "d.qsp")
    assert ef.format_version == 2 and ef.config == DENSE and ef.sparsity == sp
    assert ef.tensors["layers.1.gate_up.weight_t"].shape == (64, 2 * 96)
    assert ef.tensors["layers.0.qkv.bias"].shape == (64 + 2 * 32,)
    logits = Engine.load(tmp_path / "d.qsp", device="cpu").logits([1, 5, 7])
    assert logits.shape == (3, 120) and torch.isfinite(logits).all()


def test_version_1_cannot_claim_v2_content(tmp_path):
    t = random_tensors(DENSE, seed=3)
    write_engine(tmp_path / "d.qsp", DENSE, SparsityConfig(), t)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "d.qsp"))
    meta = _meta(tmp_path / "d.qsp")
    meta["format_version"] = "1"
    save_file(tensors, str(tmp_path / "v1.qsp"), metadata=meta)
    with pytest.raises(EngineFormatError, match="format_version 1 cannot hold this config.*needs version 2"):
        read_metadata(tmp_path / "v1.qsp")


def test_v2_config_rules():
    with pytest.raises(ValueError, match="need precision 'bf16'"):
        tiny_config(attn_bias=True)
    with pytest.raises(ValueError, match="rope_type must be one of"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling.factor must be a finite number"):
        tiny_config(rope_scaling={"rope_type": "linear", "factor": -1.0})
    with pytest.raises(ValueError, match="high_freq_factor must exceed"):
        tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                  "high_freq_factor": 1.0, "original_max_position_embeddings": 64})
    assert required_version(tiny_config(), SparsityConfig(mlp=0.5, up=0.5)) == 1  # up == gate: version 1
    assert required_version(tiny_config(), SparsityConfig(mlp=0.5, up=0.4)) == 2


def test_sparsity_parsing_forms():
    assert SparsityConfig.parse("0.5") == SparsityConfig.uniform(0.5)
    assert SparsityConfig.parse("0.1,0.2,0.3,0.4") == SparsityConfig(0.1, 0.2, 0.3, 0.4)
    five = SparsityConfig.parse("0.1,0.2,0.6,0.4,0.5")
    assert (five.attn, five.o, five.mlp, five.up_ratio, five.down) == (0.1, 0.2, 0.6, 0.4, 0.5)
    named = SparsityConfig.parse("all=0.5,gate=0.6,lm_head=0.2")
    assert (named.attn, named.mlp, named.up_ratio, named.lm_head) == (0.5, 0.6, 0.5, 0.2)
    assert SparsityConfig.from_dict(named.to_dict()) == named
    with pytest.raises(ValueError, match="unknown group 'ffn'"):
        SparsityConfig.parse("ffn=0.5")


def test_stream_writer_equals_the_dict_writer(tmp_path):
    t = random_tensors(DENSE, seed=4)
    order = ["embed_tokens", "norm", "lm_head"] + [n for n in t if n.startswith("layers.")]
    specs = {n: (tuple(t[n].shape), t[n].dtype) for n in order}
    seen = []
    write_engine_stream(tmp_path / "s.qsp", DENSE, SparsityConfig(), specs, ((n, t[n]) for n in order),
                        on_bytes=seen.append)
    a = read_engine(tmp_path / "s.qsp")
    write_engine(tmp_path / "w.qsp", DENSE, SparsityConfig(), t)
    b = read_engine(tmp_path / "w.qsp")
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in t)
    assert sum(seen) == sum(v.numel() * v.element_size() for v in t.values())


@pytest.mark.parametrize("fault", ["nan", "dtype", "order", "short"])
def test_stream_writer_faults_leave_nothing(tmp_path, fault):
    t = random_tensors(DENSE, seed=5)
    order = ["embed_tokens", "norm", "lm_head"] + [n for n in t if n.startswith("layers.")]
    specs = {n: (tuple(t[n].shape), t[n].dtype) for n in order}
    items = [(n, t[n]) for n in order]
    if fault == "nan":
        bad = items[-1][1].clone()
        bad.view(-1)[0] = math.nan
        items[-1] = (items[-1][0], bad)
        match = "contains NaN"
    elif fault == "dtype":
        items[4] = (items[4][0], items[4][1].float())
        match = "the file header says"
    elif fault == "order":
        items[3], items[4] = items[4], items[3]
        match = "expected tensor"
    else:
        items = items[:-2]
        match = "expected tensor"
    with pytest.raises((EngineFormatError, ValueError), match=match):
        write_engine_stream(tmp_path / "s.qsp", DENSE, SparsityConfig(), specs, iter(items))
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_checks_the_set_before_writing(tmp_path):
    t = random_tensors(DENSE, seed=6)
    specs = {n: (tuple(v.shape), v.dtype) for n, v in t.items() if n != "layers.1.down.weight_t"}
    with pytest.raises(EngineFormatError, match="missing .*layers.1.down.weight_t"):
        write_engine_stream(tmp_path / "s.qsp", DENSE, SparsityConfig(), specs, iter([]))
    assert list(tmp_path.iterdir()) == []


def test_benchmark_shape_and_random_engine():
    cfg = SHAPES["llama8b-bf16"]
    assert (cfg.precision, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == ("bf16", 4096, 14336, 32)
    small = ModelConfig.from_dict({**DENSE.to_dict(), "num_layers": 1})
    ef = random_engine(small, seed=1)
    assert ef.format_version == 2 and ef.tensors["layers.0.o.weight_t"].dtype == torch.bfloat16
