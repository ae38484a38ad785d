"""The opt-in int8 LM head on the CPU: the quantizer's math, the engine-file tensors and their validation, the
reference model's logits, load-time quantization and convert --lm-head int8."""
from __future__ import annotations

import json

import pytest
import torch
from builders import engine_tensors, random_reference, tiny_config
from safetensors.torch import save_file

from qsparse_infer import Engine
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import EngineFormatError, read_engine, write_engine
from qsparse_infer.model.head_int8 import Q8, Q8_SCALES, int8_head_logits, quantize_head, with_lm_head

IDS = [3, 17, 50, 9, 80, 42, 5]


def test_quantizer_math():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 37, generator=g) * torch.rand(300, 1, generator=g) * 3
    w[5] = 0  # an all-zero row: scale 0, codes 0
    q, s = quantize_head(w.to(torch.bfloat16), chunk_rows=64)  # chunking must not change anything
    wf = w.to(torch.bfloat16).float()
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (300,)
    torch.testing.assert_close(s, wf.abs().amax(1) / 127, rtol=0, atol=0)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert s[5] == 0 and not bool(q[5].any())
    nz = s > 0
    want = torch.round(wf[nz] / s[nz, None]).clamp(-127, 127)
    assert torch.equal(q[nz].float(), want)
    # the quantization error of each weight is at most half a step (plus fp32 rounding of s * q, < 1e-5 s)
    assert bool(((wf - s[:, None] * q.float()).abs() <= s[:, None] * (0.5 + 1e-5)).all())


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_head(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D float"):
        quantize_head(torch.ones(3, dtype=torch.int32))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def case(request):
    cfg = tiny_config(vocab_size=120, tie_word_embeddings=request.param)
    model = random_reference(cfg, seed=2)
    return cfg, model, engine_tensors(model)


def _write(path, cfg, tensors, int8: bool):
    t = dict(tensors)
    if int8:
        src = t["lm_head"] if "lm_head" in t else t["embed_tokens"]
        t[Q8], t[Q8_SCALES] = quantize_head(src)
    return write_engine(path, cfg, SparsityConfig(), t)


def test_file_round_trip_and_reference_logits(tmp_path, case):
    cfg, model, tensors = case
    path = _write(tmp_path / "q8.qsp", cfg, tensors, int8=True)
    ef = read_engine(path)
    assert ef.format_version == 1 and Q8 in ef.tensors and Q8_SCALES in ef.tensors
    assert ("lm_head" in ef.tensors) == (not cfg.tie_word_embeddings)  # the float head/embedding stays
    engine = Engine.load(path, device="cpu")
    got = engine.logits(IDS)
    # the same math by hand: the final-normed hidden state (fp32) against scale * Q
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    with torch.no_grad():
        float_logits = model(torch.tensor(IDS))
    want = int8_head_logits(hidden["h"], ef.tensors[Q8], ef.tensors[Q8_SCALES])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # close to the float head (per-row int8 error is ~0.4% of a row's absmax) yet not identical
    rel = float((got - float_logits).norm() / float_logits.norm())
    assert 0 < rel < 2e-2
    # the bf16 option ignores the stored int8 head
    plain = Engine.load(path, device="cpu", lm_head="bf16").logits(IDS)
    torch.testing.assert_close(plain, float_logits, rtol=1e-5, atol=1e-5)


def test_load_time_quantization_and_generation(tmp_path, case):
    cfg, _, tensors = case
    plain = _write(tmp_path / "plain.qsp", cfg, tensors, int8=False)
    stored = _write(tmp_path / "q8.qsp", cfg, tensors, int8=True)
    a = Engine.load(plain, device="cpu", lm_head="int8")
    b = Engine.load(stored, device="cpu")
    assert Q8 in a.file.tensors and Q8 not in read_engine(plain).tensors
    torch.testing.assert_close(a.logits(IDS), b.logits(IDS), rtol=0, atol=0)
    from qsparse_infer.generate.generation import generate_tokens

    run = [list(generate_tokens(e, IDS[:3], max_new_tokens=5, temperature=0.0, stop_at_eos=False)) for e in (a, b)]
    assert run[0] == run[1] and len(run[0]) == 5
    with pytest.raises(ValueError, match="lm_head must be one of"):
        Engine.load(plain, device="cpu", lm_head="int4")


def test_with_lm_head_leaves_the_original_alone(case):
    cfg, _, tensors = case
    from types import SimpleNamespace

    ef = SimpleNamespace(config=cfg, tensors=dict(tensors))
    q8 = with_lm_head(ef, "int8")
    assert Q8 in q8.tensors and Q8 not in ef.tensors
    assert with_lm_head(q8, "int8") is q8 and with_lm_head(q8, None) is q8
    assert Q8 not in with_lm_head(q8, "bf16").tensors and Q8 in q8.tensors


def test_head_input_sparsity_composes_with_int8(tmp_path, case):
    """SparsityConfig.lm_head masks the head input; the int8 head then sees the masked fp32 input."""
    cfg, model, tensors = case
    path = _write(tmp_path / "q8.qsp", cfg, tensors, int8=True)
    sp = SparsityConfig(lm_head=0.5)
    got = Engine.load(path, device="cpu", sparsity=sp).logits(IDS)
    ef = read_engine(path)
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    with torch.no_grad():
        model(torch.tensor(IDS))
    from qsparse_infer.model.quant import topk_mask

    h = hidden["h"]
    h = h * topk_mask(h, 32)
    torch.testing.assert_close(got, int8_head_logits(h, ef.tensors[Q8], ef.tensors[Q8_SCALES]), rtol=1e-5, atol=1e-5)


# -- validation ------------------------------------------------------------------------------------


def _raw(path, cfg, tensors, meta_extra=None):
    meta = {"format": "qsparse-infer", "format_version": "1", "config": cfg.to_json(),
            "sparsity": json.dumps(SparsityConfig().to_dict()), "tokenizer": json.dumps({"kind": "none"}),
            "source": ""}
    meta.update(meta_extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("breakage, message", [
    ("drop_scales", "missing required tensors"),
    ("drop_q8", "missing required tensors"),
    ("minus128", "-128"),
    ("nan_scale", "non-finite or negative"),
    ("neg_scale", "non-finite or negative"),
    ("float_q8", "must be int8"),
    ("bf16_scales", "must be float32"),
    ("short_scales", "has shape"),
    ("no_meta", "disagrees"),
])
def test_reader_rejects_bad_int8_heads(tmp_path, case, breakage, message):
    cfg, _, tensors = case
    t = dict(tensors)
    t[Q8], t[Q8_SCALES] = quantize_head(t.get("lm_head", t["embed_tokens"]))
    meta = {"lm_head": "int8"}
    if breakage == "drop_scales":
        del t[Q8_SCALES]
    elif breakage == "drop_q8":
        del t[Q8]
        meta = {}
    elif breakage == "minus128":
        t[Q8] = t[Q8].clone()
        t[Q8][3, 4] = -128
    elif breakage == "nan_scale":
        t[Q8_SCALES] = t[Q8_SCALES].clone()
        t[Q8_SCALES][7] = float("nan")
    elif breakage == "neg_scale":
        t[Q8_SCALES] = -t[Q8_SCALES]
    elif breakage == "float_q8":
        t[Q8] = t[Q8].float()
    elif breakage == "bf16_scales":
        t[Q8_SCALES] = t[Q8_SCALES].bfloat16()
    elif breakage == "short_scales":
        t[Q8_SCALES] = t[Q8_SCALES][:-1]
    elif breakage == "no_meta":
        meta = {}
    path = _raw(tmp_path / "bad.qsp", cfg, t, meta)
    with pytest.raises(EngineFormatError, match=message):
        read_engine(path)


def test_writer_marks_metadata(tmp_path, case):
    from safetensors import safe_open

    cfg, _, tensors = case
    with safe_open(str(_write(tmp_path / "a.qsp", cfg, tensors, int8=True)), "pt") as f:
        assert f.metadata()["lm_head"] == "int8" and f.metadata()["format_version"] == "1"
    with safe_open(str(_write(tmp_path / "b.qsp", cfg, tensors, int8=False)), "pt") as f:
        assert "lm_head" not in f.metadata()


def test_convert_cli_lm_head_int8(tmp_path, capsys):
    from builders import make_qsparse_folder

    from qsparse_infer.cli import main as cli

    cfg = tiny_config(vocab_size=400, tie_word_embeddings=True)
    src, _ = make_qsparse_folder(tmp_path / "ckpt", cfg)
    assert cli.main(["convert", str(src), str(tmp_path / "m.qsp"), "--lm-head", "int8"]) == 0
    assert "int8 LM head" in capsys.readouterr().out
    ef = read_engine(tmp_path / "m.qsp")
    q, s = quantize_head(ef.tensors["embed_tokens"])
    assert torch.equal(ef.tensors[Q8], q) and torch.equal(ef.tensors[Q8_SCALES], s)
    assert cli.main(["convert", str(src), str(tmp_path / "p.qsp")]) == 0
    assert Q8 not in read_engine(tmp_path / "p.qsp").tensors
    assert cli.main(["generate", "hello", "--model", str(tmp_path / "p.qsp"), "--device", "cpu", "--lm-head",
                     "int8", "--max-new-tokens", "3", "--temperature", "0"]) == 0
