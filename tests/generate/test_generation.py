"""CPU tests of the sampling rules, stop logic and the generation API on the reference fallback."""
from __future__ import annotations

import math

import pytest
import torch

import builders
from qsparse_infer.cli import main as cli
from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.engine import Engine
from qsparse_infer.model.format import write_engine
from qsparse_infer.generate.generation import _held_back, generate, generate_tokens, stream
from qsparse_infer.model.random_model import random_tensors
from qsparse_infer.generate.sampling import SamplingSettings, hash_uniform, keep_threshold, sample_cpu

# -- sampling rules -----------------------------------------------------------------------------


def _seen(v: int, marked=()) -> torch.Tensor:
    s = torch.zeros(v, dtype=torch.bool)
    s[list(marked)] = True
    return s


def test_settings_validation():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(repetition_penalty=0.0), dict(seed=1.5), dict(top_k=2.0)):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


def test_greedy_ties_go_to_lower_index():
    logits = torch.tensor([0.1, 3.0, -1.0, 3.0, 2.0])
    assert sample_cpu(logits, SamplingSettings(temperature=0), _seen(5), seed=1, step=0) == 1


def test_repetition_penalty_rule():
    logits = torch.tensor([2.0, -2.0, 1.9, -2.1])
    s = SamplingSettings(temperature=0, repetition_penalty=2.0)
    # token 0 seen: 2.0 -> 1.0, so 2 (1.9) wins; negative logits get multiplied (more negative)
    assert sample_cpu(logits, s, _seen(4, [0]), 0, 0) == 2
    from qsparse_infer.generate.sampling import apply_repetition_penalty
    out = apply_repetition_penalty(logits, _seen(4, [0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, pytest.approx(1.9), pytest.approx(-2.1)]


def test_top_k_threshold_keeps_ties():
    z = torch.tensor([1.0, 5.0, 3.0, 3.0, 0.0])
    assert keep_threshold(z, top_k=2, top_p=1.0) == 3.0  # 5 and both 3s kept
    assert keep_threshold(z, top_k=1, top_p=1.0) == 5.0
    assert keep_threshold(z, top_k=0, top_p=1.0) == -math.inf


def test_top_p_threshold():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    z = probs.log()
    assert keep_threshold(z, 0, 0.45) == pytest.approx(math.log(0.5))
    assert keep_threshold(z, 0, 0.7) == pytest.approx(math.log(0.3))
    assert keep_threshold(z, 0, 0.9) == pytest.approx(math.log(0.15))
    assert keep_threshold(z, 0, 0.99) == pytest.approx(math.log(0.05))
    # combined with top-k: mass measured inside the top-2 set (0.5 / 0.8 = 0.625 < 0.7)
    assert keep_threshold(z, 2, 0.7) == pytest.approx(math.log(0.3))


def test_samples_stay_inside_the_kept_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    s = SamplingSettings(temperature=1.5, top_k=3, seed=7)
    drawn = {sample_cpu(logits, s, _seen(50), 7, step) for step in range(200)}
    assert drawn <= top3 and len(drawn) == 3


def test_gumbel_draws_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0])
    s = SamplingSettings(temperature=1.0)
    n = 4000
    counts = torch.zeros(3)
    for step in range(n):
        counts[sample_cpu(logits, s, _seen(3), 123, step)] += 1
    expected = torch.softmax(logits, 0)
    assert torch.allclose(counts / n, expected, atol=0.03), (counts / n, expected)


def test_hash_uniform_range_and_determinism():
    u = hash_uniform(5, 3, 100000)
    assert u.dtype.name == "float32" and u.min() > 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert (hash_uniform(5, 3, 10) == u[:10]).all()
    assert not (hash_uniform(5, 4, 10) == u[:10]).all()
    assert not (hash_uniform(6, 3, 10) == u[:10]).all()


def test_held_back():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("abc", ["cx", "bcx"]) == 2


# -- the generation API on the CPU reference ---------------------------------------------------


@pytest.fixture(scope="module")
def cpu_engine(tmp_path_factory):
    cfg = ModelConfig(vocab_size=builders.VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=96, rope_theta=10000.0, activation="relu2")
    tensors = random_tensors(cfg, seed=3, float_dtype=torch.float32, embed_std=0.5)
    info = {"kind": "hf_json", "bos_id": 0, "eos_ids": [1], "pad_id": 2, "chat_template": builders.CHAT_TEMPLATE,
            "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"}}
    path = write_engine(tmp_path_factory.mktemp("gen") / "tiny.qsp", cfg, SparsityConfig.uniform(0.25), tensors,
                        info, builders.hf_tokenizer_json())
    return path, Engine.load(path, device="cpu")


def test_stream_equals_generate_on_cpu(cpu_engine):
    _, eng = cpu_engine
    from qsparse_infer.generate.generation import _CpuBackend

    _CpuBackend._warned = False
    with pytest.warns(UserWarning, match="CPU"):
        eng.generate("The king", max_new_tokens=1)
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=11)
    text = eng.generate("The king", **kw)
    pieces = list(eng.stream("The king", **kw))
    assert "".join(pieces) == text
    assert len(text) > 0 and len(pieces) > 1
    assert eng.generate("The king", **kw) == text  # the seed fixes the output
    assert generate(eng, "The king", **{**kw, "seed": 12}) != text


def test_greedy_matches_the_reference_argmax(cpu_engine):
    _, eng = cpu_engine
    ids = eng.tokenizer.encode("The sea")
    toks = list(generate_tokens(eng, ids, max_new_tokens=8, temperature=0, stop_at_eos=False))
    seq = list(ids)
    for t in toks:  # each generated token is the argmax of the full-sequence forward
        assert int(torch.argmax(eng.logits(seq)[-1])) == t
        seq.append(t)
    assert len(toks) == 8


def test_stop_strings(cpu_engine):
    _, eng = cpu_engine
    kw = dict(max_new_tokens=30, temperature=0.8, seed=5)
    full = eng.generate("Night", **kw)
    assert len(full) >= 6
    stop = full[3:6]
    cut = full.find(stop)
    assert eng.generate("Night", stop=stop, **kw) == full[:cut]
    assert "".join(stream(eng, "Night", stop=[stop, "\u2603\u2603"], **kw)) == full[:cut]
    with pytest.raises(ValueError):
        eng.generate("Night", stop="", **kw)


def test_eos_and_max_tokens(cpu_engine):
    _, eng = cpu_engine
    ids = eng.tokenizer.encode("Gold")
    toks = list(generate_tokens(eng, ids, max_new_tokens=10, temperature=0, stop_at_eos=False))
    assert len(toks) == 10
    saved = eng.tokenizer.eos_ids
    try:
        eng.tokenizer.eos_ids = [toks[4]]
        stopped = list(generate_tokens(eng, ids, max_new_tokens=10, temperature=0))
        assert stopped == toks[:toks.index(toks[4])]
    finally:
        eng.tokenizer.eos_ids = saved
    assert eng.generate("Gold", max_new_tokens=0) == ""


def test_bad_input_then_still_usable(cpu_engine):
    _, eng = cpu_engine
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(generate_tokens(eng, [1, 2, builders.VOCAB + 5]))
    with pytest.raises(ValueError, match="longer than the context"):
        list(generate_tokens(eng, [3] * 200))
    with pytest.raises(ValueError):
        eng.generate("x", max_new_tokens=-1)
    assert eng.generate("The king", max_new_tokens=4, temperature=0) == eng.generate(
        "The king", max_new_tokens=4, temperature=0)


def test_chat_uses_the_template(cpu_engine):
    _, eng = cpu_engine
    msgs = [{"role": "user", "content": "hello"}]
    text = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert eng.chat(msgs, max_new_tokens=6, temperature=0) == eng.generate(
        eng.tokenizer.encode(text), max_new_tokens=6, temperature=0)


def test_cli_generate_streams(cpu_engine, capsys):
    path, eng = cpu_engine
    rc = cli.main(["generate", "--model", str(path), "--device", "cpu", "--max-new-tokens", "6", "--seed", "3",
                   "--temperature", "0.7", "--top-k", "20", "--sparsity", "0.25", "The king"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out == eng.generate("The king", max_new_tokens=6, seed=3, temperature=0.7, top_k=20) + "\n"
