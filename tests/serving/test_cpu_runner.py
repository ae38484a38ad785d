"""The CPU runner on the built-in model: batched decode rows bit-identical to the one-sequence path, logprobs
and prompt (echo) logprobs equal to the engine's teacher-forced log-softmax, OpenAI's presence / frequency
penalties on generated tokens only, and the shared logprob helpers' tie rule."""
from __future__ import annotations

import pytest
import torch

from qsparse_infer.engine import Engine
from qsparse_infer.generate.generation import generate_tokens
from qsparse_infer.generate.sampling import SamplingSettings, apply_additive_penalties, sample_cpu
from qsparse_infer.model.reference import KVCache
from qsparse_infer.serving import logprobs as lp
from qsparse_infer.serving.runner import CpuRunner
from qsparse_infer.serving.scheduler import Delta, Finished, GenerationRequest, Scheduler

pytestmark = pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning")
# Teacher-forced logits (one forward over the whole sequence) and incremental decode (KV cache, one row at a
# time) differ only in float rounding (matmul shapes, softmax lengths): well below this in logprob units.
LP_TOL = 1e-3


@pytest.fixture(scope="module")
def engine():
    return Engine.load(None, device="cpu")


def prompts(engine, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.config.vocab_size, (int(m),), generator=g).tolist()
            for m in torch.randint(2, 30, (n,), generator=g)]


def run(engine, reqs, slots=4, prefill_chunk=512):
    sched = Scheduler(CpuRunner(engine, slots), engine.tokenizer, prefill_chunk=prefill_chunk)
    events = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        sched.submit(r, events[i].append)
    sched.run_until_idle()
    for ev in events:
        assert isinstance(ev[-1], Finished) and ev[-1].reason != "error", ev[-1]
    return [[e for e in ev if isinstance(e, Delta)] for ev in events], [ev[-1] for ev in events]


def test_forward_segments_bit_identical_to_one_sequence(engine):
    """Decode rows of sequences at lengths 1..29 and prefill chunks of others in one forward == each sequence's
    own forward call, bit for bit (logits and the caches they leave)."""
    m, cfg = engine.model, engine.config
    ps = prompts(engine, 6, seed=1)
    alone = [KVCache.empty(cfg, 64) for _ in ps]
    batch = [KVCache.empty(cfg, 64) for _ in ps]
    with torch.no_grad():
        for p, a, b in zip(ps[:4], alone, batch):  # four sequences already decoding
            m(torch.tensor(p), a, 0)
            m(torch.tensor(p), b, 0)
        toks = torch.tensor([p[-1] for p in ps[:4]])
        for step in range(3):
            segs = [(toks[i:i + 1], batch[i]) for i in range(4)]
            if step < 2:  # two prompts prefilled in two chunks each, mixed with the decode rows
                for j in (4, 5):
                    half = len(ps[j]) // 2 + 1
                    segs.append((torch.tensor(ps[j][:half] if step == 0 else ps[j][half:] or [1]), batch[j]))
            many = m.forward_segments(segs)
            for i, (ids, cache) in enumerate(segs):
                one = m(ids, alone[i], alone[i].length)
                assert torch.equal(one, many[i]), (step, i)
            toks = torch.stack([many[i][-1].argmax() for i in range(4)])
        rows = m.forward_rows(toks, batch[:4])
        assert torch.equal(rows, torch.cat([m(toks[i:i + 1], alone[i], alone[i].length) for i in range(4)]))
    for a, b in zip(alone, batch):
        assert a.length == b.length and all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v))


def test_batched_greedy_equals_engine_generate(engine):
    ps = prompts(engine, 5, seed=2)
    deltas, ends = run(engine, [GenerationRequest(p, SamplingSettings(temperature=0.0), 12, ignore_eos=True)
                                for p in ps], slots=5)
    for p, ds in zip(ps, deltas):
        want = list(generate_tokens(engine, p, 12, temperature=0.0, stop_at_eos=False))
        assert [t for d in ds for t in d.token_ids] == want


def teacher_logp(engine, ids):
    return torch.log_softmax(engine.logits(ids).double(), -1)


@pytest.mark.parametrize("chunk", [512, 5])
def test_logprobs_equal_teacher_forced_log_softmax(engine, chunk):
    """Generated tokens' logprobs and top-5, and echo logprobs (prompt prefilled in chunks of 5 too), against
    log_softmax(Engine.logits(prompt + generated)). Sampled at temperature 0.9 with penalties: logprobs are the
    raw distribution's, whatever the sampling settings."""
    ps = prompts(engine, 3, seed=3)
    settings = SamplingSettings(temperature=0.9, top_k=40, repetition_penalty=1.2, seed=7, presence_penalty=0.5,
                                frequency_penalty=0.3)
    reqs = [GenerationRequest(p, settings, 10, ignore_eos=True, logprobs=5, prompt_logprobs=True) for p in ps]
    deltas, ends = run(engine, reqs, slots=3, prefill_chunk=chunk)
    for p, ds in zip(ps, deltas):
        toks = [t for d in ds for t in d.token_ids]
        lps = [x for d in ds for x in d.logprobs]
        assert len(toks) == len(lps) == 10
        ref = teacher_logp(engine, p + toks)
        for i, (tok, x) in enumerate(zip(toks, lps)):
            row = ref[len(p) - 1 + i]
            assert x.token_id == tok and abs(x.logprob - float(row[tok])) < LP_TOL
            want = torch.topk(row, 5).values.tolist()
            assert [v for _, v in x.top] == pytest.approx(want, abs=LP_TOL)
            for tid, v in x.top:
                assert abs(v - float(row[tid])) < LP_TOL
        echo = ds[0].prompt_logprobs
        assert len(echo) == len(p) and echo[0] is None
        assert all(d.prompt_logprobs is None for d in ds[1:])
        for j in range(1, len(p)):
            assert echo[j].token_id == p[j] and abs(echo[j].logprob - float(ref[j - 1, p[j]])) < LP_TOL
            assert len(echo[j].top) == 5 and abs(echo[j].top[0][1] - float(ref[j - 1].max())) < LP_TOL


def test_echo_only_max_tokens_zero(engine):
    p = prompts(engine, 1, seed=4)[0]
    deltas, ends = run(engine, [GenerationRequest(p, SamplingSettings(temperature=0.0), 0, logprobs=1,
                                                  prompt_logprobs=True)])
    (d,), end = deltas[0], ends[0]
    assert d.token_ids == [] and end.completion_tokens == 0 and end.reason == "length"
    ref = teacher_logp(engine, p)
    assert [x.logprob for x in d.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[j - 1, p[j]]) for j in range(1, len(p))], abs=LP_TOL)


def test_penalties_count_generated_tokens_only(engine):
    """Greedy with presence_penalty 2 and frequency_penalty 1: the first token ignores the prompt (OpenAI: the
    prompt does not count); each later token is the argmax of the teacher-forced logits minus the penalties of
    the tokens generated before it."""
    p = prompts(engine, 1, seed=5)[0]
    plain = GenerationRequest(p, SamplingSettings(temperature=0.0), 8, ignore_eos=True)
    pen = GenerationRequest(p, SamplingSettings(temperature=0.0, presence_penalty=2.0, frequency_penalty=1.0), 8,
                            ignore_eos=True)
    (d_plain, d_pen), _ = run(engine, [plain, pen])
    toks = [t for d in d_pen for t in d.token_ids]
    assert toks[0] == d_plain[0].token_ids[0]
    logits = engine.logits(p + toks)
    for i in range(1, len(toks)):
        x = logits[len(p) - 1 + i].clone()
        for t in set(toks[:i]):
            x[t] -= 2.0 + 1.0 * toks[:i].count(t)
        assert int(torch.argmax(x)) == toks[i]


def test_additive_penalties_formula():
    x = torch.tensor([1.0, -2.0, 0.5, float("-inf"), 3.0])
    counts = torch.tensor([0, 1, 3, 2, 0], dtype=torch.int32)
    got = apply_additive_penalties(x, counts, presence=0.7, frequency=-0.25)
    want = x - (torch.tensor(-0.25) * counts.float() + (counts > 0).float() * 0.7)
    assert torch.equal(got, want) and got[0] == 1.0 and got[4] == 3.0
    with pytest.raises(ValueError, match="counts"):
        apply_additive_penalties(x, None, 0.5, 0.0)
    s = SamplingSettings(temperature=0.0, presence_penalty=1.5)
    assert sample_cpu(torch.tensor([1.0, 0.9]), s, torch.zeros(2, dtype=torch.bool), 0, 0,
                      torch.tensor([1, 0], dtype=torch.int32)) == 1
    for bad in (2.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="penalty"):
            SamplingSettings(presence_penalty=bad)


def test_top_tokens_tie_rule_and_gather():
    logp = torch.tensor([[-1.0, -0.5, -0.5, -3.0, -0.5, -0.0], [0.0, -0.0, -1.0, -1.0, -2.0, -1.0]])
    ids, vals = lp.top_tokens(logp, 4)
    assert ids.tolist() == [[5, 1, 2, 4], [0, 1, 2, 3]]  # equal values: the lower id first (-0.0 == 0.0)
    assert torch.equal(vals, torch.gather(logp, 1, ids))
    logits = torch.randn(3, 50)
    packed = lp.gather_logprobs(logits, torch.tensor([4, 7, 0]), 3)
    out = lp.unpack(packed, [4, 7, 0], 3)
    ref = torch.log_softmax(logits, -1)
    for r, x in enumerate(out):
        assert x.logprob == pytest.approx(float(ref[r, x.token_id]), abs=1e-6)
        assert [i for i, _ in x.top] == torch.topk(ref[r], 3).indices.tolist()
    assert lp.unpack(lp.gather_logprobs(logits, torch.tensor([1, 2, 3]), 0), [1, 2, 3], 0)[0].top == []
