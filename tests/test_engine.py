"""Engine.load / logits on the CPU reference path, device selection and input validation."""
from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch
from builders import engine_tensors, random_reference, sentencepiece_model, tiny_config
from conftest import requires_gpu

from qsparse_infer import Engine
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import write_engine

CFG = tiny_config(vocab_size=400, max_seq_len=32)
STORED = SparsityConfig(attn=0.5, o=0.5, mlp=0.5, down=0.5)


def _gpu() -> bool:
    from qsparse_infer.kernels import _ext

    return _ext.gpu_available()


@pytest.fixture(scope="module")
def model():
    return random_reference(CFG, seed=4)


@pytest.fixture
def path(tmp_path, model):
    info = {"kind": "sentencepiece", "bos_id": 1, "eos_ids": [2]}
    return write_engine(tmp_path / "m.qsp", CFG, STORED, engine_tensors(model), info, sentencepiece_model())


def test_logits_cpu_equals_reference(path, model):
    engine = Engine.load(path, device="cpu")
    assert engine.device == "cpu" and engine.sparsity == STORED and engine.config == CFG
    ids = engine.tokenizer.encode("The king and the queen.")
    model.set_sparsity(STORED)
    with torch.no_grad():
        want = model(torch.tensor(ids))
    got = engine.logits(ids)
    assert got.dtype == torch.float32 and got.shape == (len(ids), CFG.vocab_size)
    assert torch.equal(got, want)
    assert torch.equal(engine.logits(torch.tensor(ids, dtype=torch.int32)), want)


def test_sparsity_override(path, model):
    engine = Engine.load(path, device="cpu", sparsity=0.0)
    assert engine.sparsity == SparsityConfig()
    model.set_sparsity(SparsityConfig())
    ids = [5, 6, 7, 300]
    with torch.no_grad():
        assert torch.equal(engine.logits(ids), model(torch.tensor(ids)))
    assert Engine.load(path, device="cpu", sparsity="0.1,0.2,0.3,0.4").sparsity.down == 0.4


@pytest.mark.parametrize("ids, msg", [
    ([[1, 2]], "must be 1-D"), ([], "empty"), ([0.5, 1.0], "must be integers"), ([1, 400], "token id 400"),
    ([-1, 3], "token id -1"), (list(range(33)), "33 tokens exceed the model's context of 32"),
])
def test_logits_input_validation(path, ids, msg):
    engine = Engine.load(path, device="cpu")
    with pytest.raises(ValueError, match=msg):
        engine.logits(torch.tensor(ids) if ids and isinstance(ids[0], list) else ids)


def test_bad_device_name(path):
    with pytest.raises(ValueError, match="device must be"):
        Engine.load(path, device="tpu")


@pytest.mark.skipif(_gpu(), reason="checks the behaviour without a GPU")
def test_auto_without_gpu_warns_and_uses_cpu(path):
    with pytest.warns(UserWarning, match="CPU reference"):
        engine = Engine.load(path)
    assert engine.device == "cpu"


@pytest.mark.skipif(_gpu(), reason="checks the behaviour without a GPU")
def test_cuda_without_gpu_is_a_clear_error(path):
    with pytest.raises(RuntimeError, match="GPU|extension"):
        Engine.load(path, device="cuda")


@requires_gpu
def test_auto_with_gpu_picks_cuda(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Engine.load(path).device == "cuda"


def test_builtin_model_missing_is_clear(monkeypatch, tmp_path):
    eng = importlib.import_module("qsparse_infer.engine")
    monkeypatch.setattr(eng, "BUILTIN_MODEL", tmp_path / "nope" / "shakespeare.qsp")
    with pytest.raises(FileNotFoundError, match="built-in model .* is not installed"):
        Engine.load(None, device="cpu")


def test_text_methods_delegate_to_generation(path, monkeypatch):
    calls = []
    fake = types.ModuleType("qsparse_infer.generate.generation")
    for name in ("generate", "stream", "chat"):
        setattr(fake, name, lambda engine, arg, _n=name, **kw: calls.append((_n, engine, arg, kw)) or _n)
    monkeypatch.setattr(importlib.import_module("qsparse_infer.engine"), "generation", fake)
    engine = Engine.load(path, device="cpu")
    assert engine.generate("ROMEO:", max_new_tokens=3) == "generate"
    assert engine.stream("x") == "stream" and engine.chat([{"role": "user", "content": "hi"}]) == "chat"
    assert calls[0][:3] == ("generate", engine, "ROMEO:") and calls[0][3]["max_new_tokens"] == 3


def test_decode_kernel_choice_is_checked_on_the_cpu():
    """A bad decode_kernel fails where it is written, and the persistent kernel asks for a GPU on the CPU."""
    with pytest.raises(ValueError, match="decode_kernel must be one of multi, persistent, auto"):
        Engine.load(device="cpu", decode_kernel="fast")
    with pytest.raises(ValueError, match="needs a GPU"):
        Engine.load(device="cpu", decode_kernel="persistent")
    assert Engine.load(device="cpu", decode_kernel="auto").gpu is None
