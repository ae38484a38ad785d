"""Issue 10, engine files: hostile metadata, non-finite values, K = 0, file modes, temp files, races."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import engine_tensors, random_reference, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from qsparse_infer import Engine
from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.model.format import EngineFormatError, read_engine, write_engine

CFG = tiny_config(vocab_size=97, num_layers=2)


@pytest.fixture(scope="module")
def tensors():
    return engine_tensors(random_reference(CFG, seed=3))


@pytest.fixture
def good(tmp_path, tensors):
    return write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), tensors)


def _rewrite(src, dst, config=None, tensor_edit=None, **meta):
    """Copy an engine file with edited metadata / tensors, bypassing write_engine's validation."""
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k).clone() for k in f.keys()}
    if config is not None:
        md["config"] = json.dumps({**json.loads(md["config"]), **config})
    for k, v in meta.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    if tensor_edit:
        tensor_edit(ts)
    save_file(ts, str(dst), metadata=md)
    return dst


# -- 1. sizes claimed by the metadata are checked against the file before anything is allocated ----------------


def test_huge_layer_count_fails_fast_without_allocating(good, tmp_path):
    bad = _rewrite(good, tmp_path / "huge.qsp", config={"num_layers": 10**9})
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
        from qsparse_infer.model.format import read_engine, EngineFormatError
        try:
            read_engine({str(bad)!r})
        except EngineFormatError as e:
            print("ERR", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("read_engine did not refuse 10^9 layers within 60 s")
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "1000000000 layers" in out.stdout and "holds tensors for 2" in out.stdout


# -- 5. non-finite values and invalid float settings are refused at load ---------------------------------------


@pytest.mark.parametrize("name", ["embed_tokens", "norm", "layers.1.input_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_float_tensor_refused_on_load(good, tmp_path, name, value):
    def poison(ts):
        ts[name].view(-1)[3] = value

    bad = _rewrite(good, tmp_path / "nan.qsp", tensor_edit=poison)
    with pytest.raises(EngineFormatError, match=f"{name}.*NaN or infinite"):
        read_engine(bad)


def test_non_finite_float_tensor_refused_on_write(tmp_path, tensors):
    t = dict(tensors)
    t["norm"] = t["norm"].clone()
    t["norm"][0] = math.nan
    with pytest.raises(EngineFormatError, match="'norm'.*NaN or infinite"):
        write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), t)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-5), ("rope_theta", -10.0),
                                       ("rope_theta", math.nan), ("rope_theta", math.inf),
                                       ("rms_norm_eps", "abc")])
def test_bad_float_settings_refused(good, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"config.{key} must be a finite number > 0"):
        ModelConfig(**{**CFG.to_dict(), key: value})
    bad = _rewrite(good, tmp_path / "bad.qsp", config={key: value})
    with pytest.raises(EngineFormatError, match=f"{key} must be a finite number > 0"):
        read_engine(bad)


# -- 8. sparsity that keeps K = 0 channels -----------------------------------------------------------------


def test_sparsity_keeping_no_channel_refused(good, tmp_path, tensors):
    k0 = SparsityConfig(mlp=0.99)  # int(0.01 * 64) = 0 of the hidden size's 64 channels
    with pytest.raises(ValueError, match=r"sparsity.mlp = 0.99 keeps K = 0 of 64"):
        Engine.load(good, device="cpu", sparsity=k0)
    with pytest.raises(ValueError, match="keeps K = 0"):
        write_engine(tmp_path / "k0.qsp", CFG, k0, tensors)
    bad = _rewrite(good, tmp_path / "bad.qsp", sparsity=json.dumps(k0.to_dict()))
    with pytest.raises(EngineFormatError, match="keeps K = 0"):
        read_engine(bad)
    Engine.load(good, device="cpu", sparsity=SparsityConfig(mlp=0.98))  # K = 1 is allowed


# -- 8. what a path names, and the format_version message --------------------------------------------------


def test_path_that_is_not_a_file_is_named_as_such(tmp_path):
    with pytest.raises(EngineFormatError, match="is a directory"):
        read_engine(tmp_path)
    loop = tmp_path / "loop.qsp"
    os.symlink(loop, loop)
    with pytest.raises(EngineFormatError, match="cannot open.*symbolic links"):
        read_engine(loop)
    with pytest.raises(FileNotFoundError, match="no engine file given"):
        read_engine("")
    with pytest.raises(FileNotFoundError, match="no engine file given"):
        Engine.load("", device="cpu")
    with pytest.raises(FileNotFoundError, match="engine file not found"):
        read_engine(tmp_path / "absent.qsp")


def test_missing_format_version_is_named(good, tmp_path):
    bad = _rewrite(good, tmp_path / "nov.qsp", format_version=None)
    with pytest.raises(EngineFormatError, match="has no 'format_version' entry"):
        read_engine(bad)


def test_special_tokens_must_be_a_mapping(good, tmp_path):
    bad = _rewrite(good, tmp_path / "st.qsp", tokenizer=json.dumps({"kind": "none", "special_tokens": ["<s>"]}))
    with pytest.raises(EngineFormatError, match="special_tokens must map names to strings"):
        read_engine(bad)


def test_corrupt_safetensors_body_is_an_engine_format_error(good, tmp_path):
    # a header whose offsets overlap: the container check passes (offsets within the file), safetensors refuses
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    header[name]["data_offsets"][1] -= 4
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    bad = tmp_path / "overlap.qsp"
    bad.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    with pytest.raises(EngineFormatError, match=r"overlap\.qsp"):
        read_engine(bad)


# -- 8. modes: the umask's, and --force keeps the replaced file's -------------------------------------------


def test_new_file_mode_follows_umask_and_overwrite_keeps_mode(tmp_path, tensors):
    old = os.umask(0o022)
    try:
        p = write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), tensors)
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.chmod(p, 0o640)
        write_engine(p, CFG, SparsityConfig(), tensors, overwrite=True)
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# -- 3. one temp file that we own; stale ones from killed runs are removed ------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_a_killed_run_is_removed(tmp_path, tensors):
    stale = tmp_path / f".m.qsp.{_dead_pid()}-0a1b2c3d.tmp"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / ".m.qsp.1-0a1b2c3d.tmp"  # pid 1 is alive: another writer's file is left alone
    live.write_bytes(b"y")
    other = tmp_path / ".n.qsp.999999999-0a1b2c3d.tmp"  # another destination's temp file
    other.write_bytes(b"z")
    write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.qsp", live.name, other.name])


def test_only_one_temp_file_while_writing(tmp_path, tensors, monkeypatch):
    import importlib

    fmt = importlib.import_module("qsparse_infer.model.format")
    seen = []
    real = fmt.write_safetensors

    def spy(f, ts, metadata):
        real(f, ts, metadata)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(fmt, "write_safetensors", spy)
    write_engine(tmp_path / "m.qsp", CFG, SparsityConfig(), tensors)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".m.qsp.")
    assert [p.name for p in tmp_path.iterdir()] == ["m.qsp"]


def test_our_writer_round_trips_every_dtype(tmp_path):
    import importlib

    fmt = importlib.import_module("qsparse_infer.model.format")
    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.uint8),
          "c": torch.randn(4, dtype=torch.float16), "d": torch.randn(2, 2), "e": torch.zeros(0, 3),
          "f": torch.tensor([-3, 4], dtype=torch.int8), "g": torch.arange(3, dtype=torch.int64)}
    with open(tmp_path / "t.safetensors", "wb") as f:
        fmt.write_safetensors(f, ts, {"k": "v"})
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, t in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k


# -- 6. without overwrite, the final move fails if the destination appeared meanwhile -------------------------


def test_no_overwrite_race_keeps_the_other_file(tmp_path, tensors, monkeypatch):
    import importlib

    fmt = importlib.import_module("qsparse_infer.model.format")
    dst = tmp_path / "m.qsp"
    real = fmt.write_safetensors

    def racing(f, ts, metadata):  # another convert finishes first, while we are writing
        real(f, ts, metadata)
        dst.write_bytes(b"the other writer's file")

    monkeypatch.setattr(fmt, "write_safetensors", racing)
    with pytest.raises(FileExistsError, match="already exists"):
        write_engine(dst, CFG, SparsityConfig(), tensors, overwrite=False)
    assert dst.read_bytes() == b"the other writer's file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.qsp"]


def test_write_refuses_a_non_regular_destination(tmp_path, tensors):
    fifo = tmp_path / "pipe.qsp"
    os.mkfifo(fifo)
    with pytest.raises(EngineFormatError, match="not a regular file"):
        write_engine(fifo, CFG, SparsityConfig(), tensors, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
