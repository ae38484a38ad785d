"""Every rejection of the converter has a clear message, and a failed convert leaves nothing behind."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from builders import make_bitnet_folder, make_qsparse_folder, tiny_config
from safetensors.torch import load_file, save_file

import qsparse_infer
from qsparse_infer.convert.hf import ConversionError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer")


@pytest.fixture
def qs_folder(tmp_path):
    folder, _ = make_qsparse_folder(tmp_path / "ckpt", tiny_config(vocab_size=400))
    return folder


def _edit_weights(folder, fn):
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(qs_folder, tmp_path):
    _edit_config(qs_folder, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConversionError, match=r"unsupported architecture \[.GPT2LMHeadModel.\]"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)
    assert not (tmp_path / "m.qsp").exists()


def test_missing_tensor(qs_folder, tmp_path):
    _edit_weights(qs_folder, lambda sd: sd.pop("layers.1.mlp.up.weight"))
    with pytest.raises(ConversionError, match=r"missing tensor 'layers\.1\.mlp\.up\.weight'"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_shape_mismatch(qs_folder, tmp_path):
    _edit_weights(qs_folder, lambda sd: sd.update({"layers.0.attn.k.weight": torch.randn(16, 64)}))
    with pytest.raises(ConversionError, match=r"'layers\.0\.attn\.k\.weight' has shape \(16, 64\).*\(32, 64\)"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_packed_shape_mismatch(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_weights(src, lambda sd: sd.update(
        {"model.layers.0.mlp.down_proj.weight": sd["model.layers.0.mlp.down_proj.weight"][:, :50].contiguous()}))
    with pytest.raises(ConversionError, match=r"packed tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_all_zero_tensor(qs_folder, tmp_path):
    _edit_weights(qs_folder, lambda sd: sd["layers.1.attn.o.weight"].zero_())
    with pytest.raises(ConversionError, match=r"'layers\.1\.attn\.o\.weight' is all zeros"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_all_zero_packed_tensor(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_weights(src, lambda sd: sd["model.layers.1.self_attn.v_proj.weight"].fill_(0b01010101))  # all weights 0
    with pytest.raises(ConversionError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' is all zeros"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_nan_tensor(qs_folder, tmp_path):
    _edit_weights(qs_folder, lambda sd: sd["layers.0.input_norm.weight"].__setitem__(3, float("nan")))
    with pytest.raises(ConversionError, match=r"'layers\.0\.input_norm\.weight' contains NaN"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_invalid_packed_code(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_weights(src, lambda sd: sd["model.layers.0.mlp.gate_proj.weight"].__setitem__((0, 0), 0xFF))
    with pytest.raises(ConversionError, match=r"gate_proj\.weight' holds values outside"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_bad_weight_scale(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_weights(src, lambda sd: sd["model.layers.0.self_attn.q_proj.weight_scale"].fill_(float("inf")))
    with pytest.raises(ConversionError, match=r"q_proj\.weight_scale' holds an invalid scale"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_use_rms_norm_rejected(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_config(src, lambda c: c["quantization_config"].update(use_rms_norm=True))
    with pytest.raises(ConversionError, match="use_rms_norm"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_unsupported_activation(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_config(src, lambda c: c.update(hidden_act="gelu"))
    with pytest.raises(ConversionError, match="hidden_act 'gelu'"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def test_existing_dst_needs_force(qs_folder, tmp_path):
    dst = tmp_path / "m.qsp"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists.*force"):
        qsparse_infer.convert(qs_folder, dst, progress=False)
    assert dst.read_bytes() == b"precious"
    qsparse_infer.convert(qs_folder, dst, force=True, progress=False)
    assert qsparse_infer.Engine.load(dst, device="cpu").config.vocab_size == 400


@pytest.mark.parametrize("where", ["while converting", "while writing"])
def test_failed_convert_leaves_nothing(qs_folder, tmp_path, monkeypatch, where):
    conv = importlib.import_module("qsparse_infer.convert.hf")
    fmt = importlib.import_module("qsparse_infer.model.format")
    out = tmp_path / "out"
    out.mkdir()
    calls = {"n": 0}
    if where == "while converting":  # fail at the second layer
        real = conv.pack_ternary

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] > 4:
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(conv, "pack_ternary", flaky)
    else:  # fail after part of the file has been written
        real_save = fmt.write_safetensors

        def half_write(f, tensors, metadata):
            real_save(f, tensors, metadata)
            f.truncate(100)
            raise OSError("disk full")

        monkeypatch.setattr(fmt, "write_safetensors", half_write)
    with pytest.raises((KeyboardInterrupt, OSError)):
        qsparse_infer.convert(qs_folder, out / "m.qsp", progress=False)
    assert list(out.iterdir()) == []


def test_unused_tensors_are_reported(qs_folder, tmp_path):
    _edit_weights(qs_folder, lambda sd: sd.update({"layers.0.attn.extra_norm.weight": torch.ones(64)}))
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors are not used.*layers\.0\.attn\.extra_norm\.weight"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_full_precision_baseline_rejected(qs_folder, tmp_path):
    (qs_folder / "training.json").write_text(json.dumps({"precision": "fp"}))
    with pytest.raises(ConversionError, match="precision 'fp'"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)
