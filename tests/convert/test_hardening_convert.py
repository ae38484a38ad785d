"""Issue 10, the converter: destinations that are inputs or not files, SIGTERM, non-finite values, a BitNet
checkpoint without quantization_config, index files, and the recorded source."""
from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import make_bitnet_folder, make_qsparse_folder, tiny_config
from safetensors.torch import load_file, save_file

import qsparse_infer
from qsparse_infer.convert.hf import ConversionError
from qsparse_infer.model.format import read_engine

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer")


@pytest.fixture
def qs_folder(tmp_path):
    folder, _ = make_qsparse_folder(tmp_path / "ckpt", tiny_config(vocab_size=400))
    return folder


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- 2. never destroy an input, never replace a non-file --------------------------------------------------


def test_force_onto_the_checkpoints_own_weights_is_refused(qs_folder):
    weights = qs_folder / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ConversionError, match="checkpoint's own files"):
        qsparse_infer.convert(qs_folder, weights, force=True, progress=False)
    assert weights.read_bytes() == before
    qsparse_infer.convert(qs_folder, qs_folder.parent / "ok.qsp", progress=False)  # still convertible


def test_force_onto_a_hard_link_of_an_input_is_refused(qs_folder, tmp_path):
    link = tmp_path / "alias.qsp"
    os.link(qs_folder / "tokenizer.model", link)
    with pytest.raises(ConversionError, match="checkpoint's own files"):
        qsparse_infer.convert(qs_folder, link, force=True, progress=False)


def test_force_onto_a_non_regular_file_is_refused(qs_folder, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ConversionError, match="not a regular file"):
        qsparse_infer.convert(qs_folder, fifo, force=True, progress=False)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(ConversionError, match="not a regular file"):
        qsparse_infer.convert(qs_folder, "/dev/null", force=True, progress=False)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# -- 3. SIGTERM during convert leaves no temp file ---------------------------------------------------------


def test_sigterm_while_writing_leaves_nothing(qs_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import qsparse_infer.model.format as fmt
        from qsparse_infer.cli import main as cli
        real = fmt.write_safetensors
        def write_then_die(f, tensors, metadata):
            real(f, tensors, metadata)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        fmt.write_safetensors = write_then_die
        sys.exit(cli.main(["convert", {str(qs_folder)!r}, {str(out / "m.qsp")!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert list(out.iterdir()) == []
    assert "Traceback" not in proc.stderr


# -- 5. non-finite values and float settings are refused by convert ----------------------------------------


def test_nan_in_a_norm_is_refused(qs_folder, tmp_path):
    sd = load_file(str(qs_folder / "model.safetensors"))
    sd["layers.1.input_norm.weight"][5] = math.nan
    save_file(sd, str(qs_folder / "model.safetensors"))
    with pytest.raises(ConversionError, match="input_norm.*NaN"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_overflow_in_the_target_dtype_is_refused(qs_folder, tmp_path):
    sd = load_file(str(qs_folder / "model.safetensors"))
    sd["embed"][0, 0] = 1e6  # finite in fp32, inf in fp16
    save_file(sd, str(qs_folder / "model.safetensors"))
    with pytest.raises(ConversionError, match="'embed' overflows torch.float16"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", dtype="fp16", progress=False)
    assert not (tmp_path / "m.qsp").exists()


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6), ("rope_theta", -1.0),
                                       ("rope_theta", math.nan)])
def test_bad_float_settings_refused_by_convert(tmp_path, key, value):
    src = make_bitnet_folder(tmp_path / "hf", extra_config={key: value})
    with pytest.raises(ConversionError, match=f"{key} must be a finite number > 0"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


# -- 7. a BitNetForCausalLM without quantization_config is full precision to transformers ---------------------


def test_bitnet_without_quantization_config_is_refused_unless_ternarize(tmp_path):
    src = make_bitnet_folder(tmp_path / "hf", mode="online", linear_class="autobitlinear")
    _edit_config(src, lambda c: c.pop("quantization_config"))
    with pytest.raises(ConversionError, match="no quantization_config.*full precision.*--ternarize"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)
    assert not (tmp_path / "m.qsp").exists()
    with pytest.warns(UserWarning, match="outputs will differ from transformers'"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False, ternarize=True)
    assert read_engine(tmp_path / "m.qsp").config.num_layers == 2


@pytest.mark.parametrize("qc", ["bitnet", ["bitnet"], 3])
def test_quantization_config_must_be_an_object(tmp_path, qc):
    src = make_bitnet_folder(tmp_path / "hf")
    _edit_config(src, lambda c: c.update(quantization_config=qc))
    with pytest.raises(ConversionError, match="quantization_config must be an object"):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


# -- 4 / 8. config values of the wrong type, index files -------------------------------------------------


@pytest.mark.parametrize("edit,match", [
    ({"num_attention_heads": 0}, "num_attention_heads must be > 0"),
    ({"hidden_size": None}, "invalid model"),
    ({"rms_norm_eps": "abc"}, "invalid model"),
])
def test_bad_config_values_are_conversion_errors(tmp_path, edit, match):
    src = make_bitnet_folder(tmp_path / "hf", extra_config=edit)
    with pytest.raises(ConversionError, match=match):
        qsparse_infer.convert(src, tmp_path / "m.qsp", progress=False)


def _shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    return folder / "model.safetensors.index.json"


def test_index_with_bad_json_names_the_file(qs_folder, tmp_path):
    _shard(qs_folder).write_text("{not json")
    with pytest.raises(ConversionError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def test_index_without_weight_map_names_the_file(qs_folder, tmp_path):
    _shard(qs_folder).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConversionError, match=r"model\.safetensors\.index\.json has no 'weight_map'"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


def _corrupt_append(p):
    p.write_bytes(p.read_bytes() + b"\0")


def _corrupt_empty(p):
    p.write_bytes(b"")


def _corrupt_header(p, fn):
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    body = json.dumps(header).encode()
    p.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


def _first(header):
    return next(k for k in header if k != "__metadata__")


CORRUPTIONS = {
    "one byte appended": _corrupt_append,
    "empty": _corrupt_empty,
    "non-string metadata": lambda p: _corrupt_header(p, lambda h: h.update({"__metadata__": {"format": 1}})),
    "unknown dtype": lambda p: _corrupt_header(p, lambda h: h[_first(h)].update(dtype="X9")),
    "negative offset": lambda p: _corrupt_header(p, lambda h: h[_first(h)].update(data_offsets=[-4, 8])),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_shard_is_a_conversion_error_naming_the_file(qs_folder, tmp_path, how):
    CORRUPTIONS[how](qs_folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model\.safetensors"):
        qsparse_infer.convert(qs_folder, tmp_path / "m.qsp", progress=False)


# -- newcomer: the recorded source is not the converting machine's absolute path ------------------------------


def test_source_is_not_an_absolute_path(qs_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qsparse_infer.convert(qs_folder, tmp_path / "a.qsp", progress=False)
    assert read_engine(tmp_path / "a.qsp").source == "QSparseForCausalLM from ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    qsparse_infer.convert(qs_folder, tmp_path / "b.qsp", progress=False)
    source = read_engine(tmp_path / "b.qsp").source
    assert source == "QSparseForCausalLM from ckpt" and str(tmp_path) not in source


def test_builtin_model_records_no_absolute_path():
    from qsparse_infer.engine import BUILTIN_MODEL

    source = read_engine(BUILTIN_MODEL).source
    assert not any(part.startswith("/") for part in source.split())
