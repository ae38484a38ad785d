"""GpuBatchRunner's Python (async launch protocol, mixed prefill + decode steps, host-side lengths and states,
logprob rows, prompt logprobs, penalty state) on the CPU, with its kernels replaced by plain-torch twins
(tests/gpu_emulation.py). Numerics of the real kernels are the GPU tests' business; here the twins compute
each row on its own, so a row's result must not depend on what shares its step, and the runner's answers
must match the CPU reference model (teacher-forced logits) up to float rounding."""
from __future__ import annotations

import pytest
import torch

from gpu_emulation import emulated_gpu
from qsparse_infer.engine import Engine
from qsparse_infer.generate.sampling import SamplingSettings
from qsparse_infer.serving.runner import CpuRunner, PrefillChunk, StepPlan
from qsparse_infer.serving.scheduler import Delta, Finished, GenerationRequest, Scheduler

pytestmark = [pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning"), pytest.mark.slow]
GREEDY = SamplingSettings(temperature=0.0)
LP_TOL = 1e-3  # fp32 KV cache here: only the order of float operations differs from the reference
# ...but that order decides near-ties: a twin computes one row at a time, the reference a whole sequence, and the
# BLAS kernels for the two shapes sum in different orders on different CPUs. Where a top-K rank or an int8 rounding
# sits within ~1e-7 of a tie, one kept channel or one q flips; that position's hidden state moves, and every later
# position attends to it. On the H200 host's CPU (torch 2.11) one prompt showed 7 of 23 positions above LP_TOL,
# worst 0.041, decaying along the sequence; here none. So: every position within FLIP_TOL, most within LP_TOL. The
# bookkeeping this test is for fails that by far: a row shifted by one position or read from another slot gives
# the logprob of another context, off by O(1) (and the tokens and top-1 checks beside it fail outright).
FLIP_TOL = 0.15
MIN_EXACT = 0.5  # share of positions within LP_TOL


def assert_logprobs_close(got: list[float], want: list[float]) -> None:
    err = [abs(g - w) for g, w in zip(got, want, strict=True)]
    assert max(err, default=0.0) < FLIP_TOL, err
    assert sum(e < LP_TOL for e in err) >= MIN_EXACT * len(err), err


@pytest.fixture(scope="module")
def engine():
    return Engine.load(None, device="cpu")


@pytest.fixture(scope="module")
def runner(engine):
    """One emulated runner for the module (8 slots; begin() resets a slot, as the tests rely on)."""
    from qsparse_infer.serving.gpu_runner import GpuBatchRunner

    with pytest.MonkeyPatch.context() as mp, emulated_gpu(mp):
        yield GpuBatchRunner(engine, max_slots=8, max_len=64, use_graph=False, kv_dtype=torch.float32)


def prompts(engine, n, seed=0, lo=2, hi=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.config.vocab_size, (int(m),), generator=g).tolist()
            for m in torch.randint(lo, hi, (n,), generator=g)]


def test_launch_is_asynchronous_and_lengths_are_host_side(runner):
    r = runner
    assert r.asynchronous
    r.begin(0, GREEDY, 0)
    r.begin(1, GREEDY, 0, logprobs=2)
    h = r.launch(StepPlan(prefills=[PrefillChunk(0, [5, 6, 7], True), PrefillChunk(1, [9, 10], False)]))
    assert r.length(0) == 3 and r.length(1) == 2  # known before the result is read
    res = h.result()
    assert res.prefill_tokens[1] is None and isinstance(res.prefill_tokens[0], int)
    h2 = r.launch(StepPlan(prefills=[PrefillChunk(1, [11], True)], decode=[0]))
    res2 = h2.result()
    assert len(res2.decode_tokens) == 1 and res2.decode_logprobs == [None]
    assert res2.prefill_logprobs[0].token_id == res2.prefill_tokens[0] and len(res2.prefill_logprobs[0].top) == 2
    assert r.length(0) == 4 and r.length(1) == 3
    assert int(r.pos[0]) == 4 and int(r.pos[1]) == 3  # device positions agree with the host's
    with pytest.raises(RuntimeError, match="prefill"):
        r.launch(StepPlan(decode=[2]))  # never begun
    with pytest.raises(ValueError, match="twice"):
        r.launch(StepPlan(prefills=[PrefillChunk(1, [1], False)], decode=[1]))
    r.release(0)
    r.release(1)


def test_rows_independent_of_step_company(runner):
    """A sequence's decode logits are the same (torch.equal) alone, batched with others, and in mixed steps where
    other prompts are prefilled in chunks; chunked prefill == one chunk."""
    r = runner
    eng_ps = [[3, 17, 99, 250, 7], [1000, 2, 2, 2], [42], [5, 6, 7, 8, 9, 10, 11, 12], [77, 78, 79]]

    def alone(p, slot):
        r.begin(slot, GREEDY, 0)
        toks = [r.prefill(slot, p, last=True)]
        lg = []
        for _ in range(3):
            toks += r.decode([slot])
            lg.append(r.last_logits()[0])
        r.release(slot)
        return toks, lg

    want = [alone(p, 0) for p in eng_ps]
    # sequences 0-2 decode while 3 and 4 are prefilled in chunks of 3 in the same steps
    for s, p in zip((0, 1, 2), eng_ps[:3]):
        r.begin(s, GREEDY, 0)
        assert r.prefill(s, p, last=True) == want[s][0][0]
    r.begin(3, GREEDY, 0)
    r.begin(4, GREEDY, 0)
    got = {0: [], 1: [], 2: []}
    p3, p4 = eng_ps[3], eng_ps[4]
    plans = [StepPlan([PrefillChunk(3, p3[:3], False), PrefillChunk(4, p4, True)], [0, 1, 2]),
             StepPlan([PrefillChunk(3, p3[3:6], False)], [0, 1, 2, 4]),
             StepPlan([PrefillChunk(3, p3[6:], True)], [0, 1, 2, 4])]
    firsts = {}
    for step, plan in enumerate(plans):
        res = r.launch(plan).result()
        lg = r.last_logits()
        for i, s in enumerate(plan.decode):
            if s in got:
                got[s].append(res.decode_tokens[i])
                assert torch.equal(lg[i], want[s][1][step]), (step, s)
        for i, c in enumerate(plan.prefills):
            if c.sample:
                firsts[c.slot] = res.prefill_tokens[i]
    for s in (0, 1, 2):
        assert got[s] == want[s][0][1:]
    assert firsts == {3: want[3][0][0], 4: want[4][0][0]}
    for s in range(5):
        r.release(s)


def test_scheduler_on_emulated_gpu_alone_equals_among_many(engine, runner):
    """Through the overlapping scheduler: each greedy request gives the same tokens alone and among 6 concurrent
    ones (prefill chunks mixed with decode rows), EOS / stop strings / max_tokens hold, no slot leaks."""
    ps = prompts(engine, 6, seed=2, lo=2, hi=30)
    def run(reqs):
        sched = Scheduler(runner, engine.tokenizer, prefill_chunk=24)
        evs = [[] for _ in reqs]
        for i, q in enumerate(reqs):
            sched.submit(q, evs[i].append)
        sched.run_until_idle()
        st = sched.stats()
        assert (st["active"], st["waiting"], st["free_slots"]) == (0, 0, runner.max_slots)
        return evs, st

    def reqs():
        out = []
        for i, p in enumerate(ps):
            stop = [engine.tokenizer.decode([p[0]])[:1] or "e"] if i % 3 == 1 else []
            out.append(GenerationRequest(p, GREEDY, 3 + i % 3, stop=stop, ignore_eos=i % 2 == 0))
        return out

    alone = [run([q])[0][0] for q in reqs()]
    many, st = run(reqs())
    assert st["mixed_steps"] > 0
    for a, m in zip(alone, many):
        assert [(type(e).__name__, getattr(e, "token_ids", None), getattr(e, "text", None)) for e in a] == \
               [(type(e).__name__, getattr(e, "token_ids", None), getattr(e, "text", None)) for e in m]
        assert isinstance(m[-1], Finished) and m[-1].reason in ("stop", "length")


def test_greedy_and_logprobs_match_the_cpu_reference(engine, runner):
    """Tokens equal the CPU runner's (same model, twins of the kernels: only rounding differs; this model's
    near-ties are rarer than that), logprobs and echo logprobs equal the teacher-forced log-softmax."""
    ps = prompts(engine, 3, seed=3)
    reqs = [GenerationRequest(p, GREEDY, 8, ignore_eos=True, logprobs=3, prompt_logprobs=True) for p in ps]

    def run(runner):
        sched = Scheduler(runner, engine.tokenizer, prefill_chunk=7)
        evs = [[] for _ in reqs]
        for i, q in enumerate(reqs):
            sched.submit(q, evs[i].append)
        sched.run_until_idle()
        return [[e for e in ev if isinstance(e, Delta)] for ev in evs]

    gpu = run(runner)
    cpu = run(CpuRunner(engine, 3))
    for p, g, c in zip(ps, gpu, cpu):
        toks = [t for d in g for t in d.token_ids]
        assert toks == [t for d in c for t in d.token_ids]
        ref = torch.log_softmax(engine.logits(p + toks).double(), -1)
        got, want = [], []
        for i, x in enumerate(x for d in g for x in d.logprobs):
            assert x.token_id == toks[i]
            got.append(x.logprob), want.append(float(ref[len(p) - 1 + i, toks[i]]))
            assert [t for t, _ in x.top][:1] == [int(ref[len(p) - 1 + i].argmax())]
        echo = g[0].prompt_logprobs
        assert echo[0] is None and len(echo) == len(p)
        for j in range(1, len(p)):
            assert echo[j].token_id == p[j]
            got.append(echo[j].logprob), want.append(float(ref[j - 1, p[j]]))
        assert_logprobs_close(got, want)


def test_penalties_and_seeded_sampling_state(engine, runner):
    """The runner keeps per-slot generated-token counts and penalties for the sampler: seeded sampling with
    presence/frequency penalties gives the CPU runner's tokens (same rules), and a reused slot starts clean."""
    p = prompts(engine, 1, seed=4)[0]
    settings = SamplingSettings(temperature=0.8, top_k=50, seed=11, presence_penalty=1.5, frequency_penalty=0.5)
    req = GenerationRequest(p, settings, 10, ignore_eos=True)

    def run(r, n=1):
        sched = Scheduler(r, engine.tokenizer)
        outs = []
        for _ in range(n):
            ev = []
            sched.submit(req, ev.append)
            sched.run_until_idle()
            outs.append([t for e in ev if isinstance(e, Delta) for t in e.token_ids])
        return outs

    gpu = run(runner, n=2)
    assert gpu[0] == gpu[1]  # slot reused: counts, seen, RNG step reset
    assert gpu[0] == run(CpuRunner(engine, 1))[0]
