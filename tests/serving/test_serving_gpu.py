"""The batched GPU decoder (serving/gpu_runner.py) and its batched kernels (dk.sample_batch, multi-row
dk.lm_head), on small random models.

Exactness (torch.equal) where the kernels are the same:
  - sample_batch row b == the single-row kernel on that row's state (same code, one block per row);
  - lm_head over T rows == T one-row calls (explicit fma order, see csrc/decode/head.cu);
  - chunked prefill == one chunk (the prefill attention computes each query from position 0);
  - a sequence's logits decoded in a batch of B (B = 1, 3, 8, 33: GEMV and GEMM paths, padding rows) ==
    its logits decoded alone in the same runner: every ternary_linear path (t1 at B = 1 included) gives a
    row the same bits (exact int32 sums, shared epilogue, the same RMSNorm sum order), and the batched
    attention kernels are batch-invariant by contract.
Tolerance against GpuModel (single-sequence decoder): its decode uses the t1 kernel and the split-K
attention, so step logits differ by rounding: rel. error <= STEP_TOL (tests/gpu/test_gpu_model_gpu.py's bound
for decode-step logits) and greedy tokens equal up to the near-tie rule (EPS_TIE) of that file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import requires_gpu  # noqa: E402

from qsparse_infer.kernels import decode as dk  # noqa: E402
from qsparse_infer.model.config import ModelConfig, SparsityConfig  # noqa: E402
from qsparse_infer.gpu.model import GpuModel  # noqa: E402
from qsparse_infer.model.random_model import random_engine  # noqa: E402
from qsparse_infer.generate.sampling import SamplingSettings  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]
DEV = "cuda"
EPS_TIE = 2e-3
STEP_TOL = 2e-2

CFG = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=352, num_layers=3, num_heads=8, num_kv_heads=2,
                  head_dim=32, max_seq_len=160, rope_theta=10000.0, activation="relu2", attn_sub_norm=True,
                  ffn_sub_norm=True, tie_word_embeddings=True)
SPARSITY = SparsityConfig(attn=0.5, o=0.4, mlp=0.6, down=0.3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ef():
    return random_engine(CFG, SPARSITY, seed=11, float_dtype=torch.bfloat16, embed_std=0.5)


@pytest.fixture(scope="module")
def runner(ef):
    from qsparse_infer.serving.gpu_runner import GpuBatchRunner

    return GpuBatchRunner(ef, max_slots=40, max_len=96)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(0, CFG.vocab_size, (m,), generator=g).tolist() for m in lens]


# -- kernels -------------------------------------------------------------------------------------------


def _state(s: int, v: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    temps = torch.tensor([0.0, 0.7, 1.0, 0.9, 1.3, 0.0, 0.5])[torch.arange(s) % 7]
    return dict(
        seen=(torch.rand(s, v, generator=gen) < 0.01).to(torch.uint8).to(DEV),
        fparams=torch.stack([temps, torch.tensor([1.0, 0.9, 1.0, 0.8, 1.0, 1.0, 0.5])[torch.arange(s) % 7],
                             torch.tensor([1.0, 1.3, 1.0, 1.1, 2.0, 1.5, 1.0])[torch.arange(s) % 7]], 1).to(DEV),
        iparams=torch.tensor([0, 50, 0, 40, 1, 0, 7])[torch.arange(s) % 7].to(torch.int32).to(DEV),
        rng=torch.stack([torch.arange(s) * 7919 + 3, torch.arange(s) % 5], 1).to(torch.int64).to(DEV),
        pos=torch.randint(0, 30, (s,), generator=gen).to(torch.int32).to(DEV),
        token=torch.full((s,), -7, dtype=torch.int32, device=DEV),
        history=torch.full((s, 64), -1, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("b,v", [(1, 50_000), (5, 32_003), (16, 1000)])
def test_sample_batch_equals_single_rows(b, v):
    """Each row of one batched launch (rows naming slots out of order) == the single-row kernel on that row."""
    gen = torch.Generator().manual_seed(b)
    s = b + 3
    logits = (torch.randn(b, v, generator=gen) * 3).to(DEV)
    logits[0, 11] = logits[0, 12] = 50.0  # a greedy tie in row 0 (if greedy): the lower index wins
    slots = torch.randperm(s, generator=gen)[:b].to(torch.int32).to(DEV)
    st = _state(s, v, gen)
    single = {k: t.clone() for k, t in st.items()}
    for _ in range(3):  # three steps: the state each launch leaves is what the next one reads
        dk.sample_batch(logits, st["seen"], st["fparams"], st["iparams"], st["rng"], st["pos"], st["token"],
                        slots=slots, history=st["history"], advance=2)
        for row, r in enumerate(slots.tolist()):
            dk.sample(logits[row], single["seen"][r], single["fparams"][r], single["iparams"][r:r + 1],
                      single["rng"][r], single["pos"][r:r + 1], single["token"][r:r + 1], single["history"][r],
                      advance=2)
        for k in st:
            assert torch.equal(st[k], single[k]), f"{k} differs"
    assert (st["token"][slots.long()] >= 0).all()
    free = [r for r in range(s) if r not in slots.tolist()]
    assert (st["token"][free] == -7).all(), "a row wrote another sequence's state"


@pytest.mark.parametrize("v", [50_000, 1003])
def test_sample_batch_penalties_equal_cpu_rule(v):
    """Presence/frequency penalties (with and without the repetition penalty, greedy and sampled rows) give the
    CPU rule's token (sample_cpu with the same counts) bit for bit, and counts[r][token] grows by one."""
    from qsparse_infer.generate.sampling import sample_cpu

    gen = torch.Generator().manual_seed(v)
    b = 12
    logits = (torch.randn(b, v, generator=gen) * 2).to(DEV)
    counts = torch.randint(0, 4, (b, v), generator=gen, dtype=torch.int32) * (torch.rand(b, v, generator=gen) < 0.02)
    counts = counts.to(torch.int32)
    top = logits.argmax(1).cpu()
    counts[torch.arange(b), top] = torch.arange(b, dtype=torch.int32) % 3  # the argmax itself penalised or not
    pens = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [-1.5, 0.7], [1.3, -0.4], [0.5, 0.5]] * 2)
    temps = torch.tensor([0.0] * 6 + [0.8] * 6)
    fparams = torch.stack([temps, torch.full((b,), 0.9), torch.tensor([1.0, 1.3] * 6)], 1)
    iparams = torch.tensor([0, 40] * 6, dtype=torch.int32)
    rng = torch.stack([torch.arange(b) * 31 + 5, torch.arange(b) % 4], 1).to(torch.int64)
    seen = (torch.rand(b, v, generator=gen) < 0.01).to(torch.uint8)
    st = {k: t.to(DEV) for k, t in dict(seen=seen, fparams=fparams, iparams=iparams, rng=rng).items()}
    pos = torch.zeros(b, dtype=torch.int32, device=DEV)
    token = torch.full((b,), -1, dtype=torch.int32, device=DEV)
    c_dev = counts.to(DEV)
    dk.sample_batch(logits, st["seen"], st["fparams"], st["iparams"], st["rng"], pos, token, counts=c_dev,
                    penalties=pens.to(DEV))
    got = token.cpu().tolist()
    for r in range(b):
        settings = SamplingSettings(float(temps[r]), int(iparams[r]), 0.9, float(fparams[r, 2]), None,
                                    float(pens[r, 0]), float(pens[r, 1]))
        want = sample_cpu(logits[r].cpu(), settings, seen[r].bool(), int(rng[r, 0]), int(rng[r, 1]), counts[r])
        assert got[r] == want, f"row {r}: {got[r]} vs {want}"
    assert torch.equal(c_dev.cpu() - counts, torch.nn.functional.one_hot(torch.tensor(got), v).to(torch.int32))


@pytest.mark.parametrize("head,h", [("cuda_cores", 256), ("cuda_cores", 330), ("cuda_cores", 2560),
                                    ("tensor_cores", 256), ("tensor_cores", 2560)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_lm_head_rows_bit_identical(head, h, with_norm):
    """T rows in one call (for the CUDA-core head 1 or 2 passes of <= 16 rows; for the tensor-core head 1 or 2
    groups of 16 in one launch) == T one-row calls, bit for bit."""
    fn = dk.lm_head if head == "cuda_cores" else dk.lm_head_mma
    v, t = 1003, 21
    g = torch.Generator(device=DEV).manual_seed(h)
    w = torch.randn(v, h, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(t, h, generator=g, device=DEV) * 4
    nw = torch.randn(h, generator=g, device=DEV) if with_norm else None
    many = torch.full((t, v), float("nan"), device=DEV)
    fn(x, w, norm_weight=nw, eps=1e-6, out=many)
    for n in (3, 16):
        part = torch.full((n, v), float("nan"), device=DEV)
        fn(x[:n], w, norm_weight=nw, eps=1e-6, out=part)
        assert torch.equal(part, many[:n])
    for i in range(t):
        one = torch.full((1, v), float("nan"), device=DEV)
        fn(x[i:i + 1], w, norm_weight=nw, eps=1e-6, out=one)
        assert torch.equal(one[0], many[i]), f"row {i}"


@pytest.mark.parametrize("t,v,h", [(1, 1003, 2560), (16, 4099, 256), (37, 517, 4096), (64, 2000, 2560)])
def test_lm_head_mma_accuracy(t, v, h):
    """The tensor-core head against an fp64 reference: max |error| <= 5e-5 * max |logit|. Why that holds: xn is
    carried as hi + lo bf16 terms (16 significant bits, 2^-17 relative per element), the bf16 products are
    exact in fp32, and the fp32 accumulation runs over H/16 mma steps; the CUDA-core head meets the same bound.
    Also: odd V (the last n-tile half out of range), T not a multiple of 16, rows past T never written."""
    g = torch.Generator(device=DEV).manual_seed(t + v)
    w = torch.randn(v, h, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(t + 3, h, generator=g, device=DEV) * 4
    nw = torch.rand(h, generator=g, device=DEV) + 0.5
    out = torch.full((t + 3, v), float("nan"), device=DEV)
    dk.lm_head_mma(x[:t], w, norm_weight=nw, eps=1e-6, out=out[:t])
    assert torch.isnan(out[t:]).all(), "rows past T were written"
    x64 = x[:t].double()
    xn = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    ref = xn @ w.double().t()
    bound = 5e-5 * ref.abs().max().item()
    assert (out[:t].double() - ref).abs().max().item() <= bound
    cuda_cores = dk.lm_head(x[:t], w, norm_weight=nw, eps=1e-6)
    assert (cuda_cores.double() - ref).abs().max().item() <= bound


def test_lm_head_mma_rejects_unsupported():
    w = torch.zeros(10, 330, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 128"):
        dk.lm_head_mma(torch.zeros(2, 330, device=DEV), w)
    with pytest.raises(ValueError, match="bfloat16"):
        dk.lm_head_mma(torch.zeros(2, 256, device=DEV), torch.zeros(10, 256, device=DEV))


@pytest.mark.parametrize("d,glu,residual", [(2053, None, False), (4099, None, True), (1027, "relu2", False)])
def test_linear_paths_give_rows_the_same_bits(d, glu, residual):
    """ternary_linear over 11 rows: the gather-GEMV (groups of 8, fused or split by D) and the GEMM give each
    row the same bits, with or without a fused RMSNorm, and so does the one-token kernel row by row (every kernel
    forms the norm's sum of squares in one order). This is what lets the runner batch rows on any path and
    still give a sequence the same logits alone and batched."""
    from qsparse_infer.kernels.linear import PackedTernary, ternary_linear

    gen = torch.Generator().manual_seed(d)
    segs = (64, 64) if glu else (301,)
    layout = "interleave" if glu else "concat"
    w = PackedTernary.from_ternary([torch.randint(-1, 2, (n, d), generator=gen, dtype=torch.int8) for n in segs],
                                   [0.7, 1.3][:len(segs)], layout, device=DEV)
    x = torch.randn(11, d, generator=gen).to(DEV)
    x[3] = x[2]  # identical rows stay identical
    k = int(0.4 * d)
    n_out = segs[0] if glu else sum(segs)
    res = torch.randn(11, n_out, generator=gen).to(DEV) if residual else None
    for nw in (None, (torch.rand(d, generator=gen) + 0.5).to(DEV)):
        outs = {}
        for path in ("t1", "gemv", "gemm"):
            outs[path] = ternary_linear(x, w, k, norm_weight=nw, glu=glu, residual=res, _path=path)
            assert torch.isfinite(outs[path]).all()
        assert torch.equal(outs["gemv"], outs["gemm"])
        if res is None:
            assert torch.equal(outs["gemm"][3], outs["gemm"][2])
        for i in range(11):  # one row alone == that row in the batch
            one = ternary_linear(x[i:i + 1], w, k, norm_weight=nw, glu=glu,
                                 residual=None if res is None else res[i:i + 1], _path="gemv")
            assert torch.equal(one[0], outs["gemm"][i])
        assert torch.equal(outs["t1"], outs["gemm"])


# -- the runner ----------------------------------------------------------------------------------------

STEPS = 4


def decode_alone(runner, ids: list[int], slot: int) -> tuple[list[int], list[torch.Tensor]]:
    runner.begin(slot, SamplingSettings(temperature=0.0), 0)
    toks = [runner.prefill(slot, ids, last=True)]
    logits = []
    for _ in range(STEPS):
        toks += runner.decode([slot])
        logits.append(runner.last_logits()[0])
    runner.release(slot)
    return toks, logits


@pytest.mark.parametrize("b", [1, 3, 8, 33])
def test_batched_logits_equal_alone(runner, b):
    """Mixed prompt lengths; each sequence alone in slot 0, then all together in shuffled slots: every decode
    step's logits row is bit-identical (and so are the greedy tokens)."""
    ps = prompts(b, seed=b)
    alone = [decode_alone(runner, p, 0) for p in ps]
    slots = torch.randperm(runner.max_slots, generator=torch.Generator().manual_seed(b))[:b].tolist()
    toks = {}
    for s, p in zip(slots, ps):
        runner.begin(s, SamplingSettings(temperature=0.0), 0)
        toks[s] = [runner.prefill(s, p, last=True)]
    for step in range(STEPS):
        out = runner.decode(slots)
        got = runner.last_logits()
        assert got.shape == (b, CFG.vocab_size)
        for i, s in enumerate(slots):
            toks[s].append(out[i])
            assert torch.equal(got[i], alone[i][1][step]), f"B={b} row {i} (slot {s}) step {step}"
    for i, s in enumerate(slots):
        assert toks[s] == alone[i][0]
        assert runner.length(s) == len(ps[i]) + STEPS
        runner.release(s)


def test_greedy_matches_gpu_model(ef, runner):
    """Greedy tokens == GpuModel's for the same prompts (up to the near-tie rule), decoded as one batch."""
    ps = prompts(5, seed=42)
    n = 24
    slots = [3, 9, 0, 31, 17]
    want, ref_logits = [], []
    gm = GpuModel(ef, max_len=96)
    for p in ps:
        toks = [gm.prefill(p, SamplingSettings(temperature=0.0), seed=0)]
        lg = []
        for _ in range(n):
            toks.append(gm.step())
            lg.append(gm.logits_buf[0].cpu())
        want.append(toks)
        ref_logits.append(lg)
    del gm
    got = {}
    for s, p in zip(slots, ps):
        runner.begin(s, SamplingSettings(temperature=0.0), 0)
        got[s] = [runner.prefill(s, p, last=True)]
    worst = 0.0
    live = list(range(len(ps)))  # sequences still compared token by token
    for step in range(n):
        out = runner.decode(slots)
        lg = runner.last_logits()
        for i, s in enumerate(slots):
            got[s].append(out[i])
            if i not in live:
                continue
            worst = max(worst, rel(lg[i], ref_logits[i][step]))
            if out[i] != want[i][step + 1]:
                r = ref_logits[i][step]
                gap = float(r.max() - r[out[i]])
                assert gap < EPS_TIE * float(r.abs().max()), f"seq {i} step {step}: {out[i]} vs {want[i][step + 1]}"
                live.remove(i)  # a near-tie flip: the sequences diverge from here
    for i, s in enumerate(slots):
        assert got[s][0] == want[i][0], "prefill (same kernels) must give the same first token"
        runner.release(s)
    assert len(live) >= len(ps) - 1, "more than one near-tie flip"
    assert worst < STEP_TOL, f"step logits rel err {worst:.2e} vs GpuModel"


def test_seeded_sampling_alone_equals_batched(runner):
    """A seeded request gives the same tokens alone and batched; a released and reused slot carries nothing
    over (repetition penalty `seen` row, RNG step, position)."""
    settings = SamplingSettings(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3)
    p = prompts(1, seed=5)[0]

    def run(slot: int, others: list[int]) -> list[int]:
        runner.begin(slot, settings, 2**63 + 12345)  # a seed above 2^63: the full 64 bits are kept
        toks = [runner.prefill(slot, p, last=True)]
        for o in others:
            runner.begin(o, SamplingSettings(temperature=0.7, repetition_penalty=2.0), o)
            runner.prefill(o, [o + 1, 2 * o + 3, 5], last=True)
        for _ in range(12):
            toks.append(runner.decode([slot] + others)[0])
        for o in [slot] + others:
            runner.release(o)
        return toks

    first = run(4, [])
    assert run(4, [1, 2, 7]) == first  # same slot reused, now batched with others
    assert run(7, [4, 30]) == first  # another slot; slot 4 was just used by another sequence


def test_chunked_prefill(runner):
    """Prefill in 3 chunks (7, 2, rest: none of one token, so no t1 row) == one chunk, bit for bit: the prefill
    attention computes each query from position 0 whatever the chunk, and every other ternary_linear path
    gives a row the same bits."""
    p = prompts(1, seed=9)[0] + prompts(1, seed=10)[0] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    whole, lw = decode_alone(runner, p, 2)
    runner.begin(2, SamplingSettings(temperature=0.0), 0)
    assert runner.prefill(2, p[:7], last=False) is None
    assert runner.prefill(2, p[7:9], last=False) is None and runner.length(2) == 9
    toks = [runner.prefill(2, p[9:], last=True)]
    assert runner.length(2) == len(p)
    for step in range(STEPS):
        toks += runner.decode([2])
        assert torch.equal(runner.last_logits()[0], lw[step])
    runner.release(2)
    assert toks == whole


def test_padding_rows_never_touch_real_slots(runner):
    """Poison a free slot's KV cache and sequence state and the scratch slot's cache; decode 3 slots (bucket 4:
    one padding row) and 5 (bucket 8: three): the free slot is bit-for-bit untouched, the scratch slot was
    written (the padding rows ran there), real slots only at their own positions."""
    free = 12
    kp, vp = runner.k_pool, runner.v_pool
    kp[:, free].fill_(float("nan"))
    vp[:, free].fill_(float("nan"))
    kp[:, runner.scratch].fill_(float("nan"))
    state = {name: getattr(runner, name) for name in ("seen", "fparams", "iparams", "rng", "pos", "token")}
    state["seen"][free].fill_(1)
    state["pos"][free] = 77
    state["token"][free] = 999
    before = {k: t[free].clone() for k, t in state.items()}
    kb, vb = kp[:, free].clone(), vp[:, free].clone()
    for slots in ([0, 5, 20], [1, 2, 3, 6, 39]):
        for s in slots:
            runner.begin(s, SamplingSettings(temperature=0.0), 0)
            runner.prefill(s, [s + 1, s + 2], last=True)
        unused_pos = kp[:, slots[0], :, 10:].clone()
        for _ in range(3):
            runner.decode(slots)
        assert torch.equal(kp[:, slots[0], :, 10:].view(torch.int16), unused_pos.view(torch.int16))
        for s in slots:
            runner.release(s)
    assert torch.equal(kp[:, free].view(torch.int16), kb.view(torch.int16))
    assert torch.equal(vp[:, free].view(torch.int16), vb.view(torch.int16))
    for k, t in state.items():
        assert torch.equal(t[free], before[k]), f"{k} of the free slot changed"
    assert not torch.isnan(kp[:, runner.scratch, :, 0]).any(), "padding rows did not run in the scratch slot"
    assert torch.isnan(kp[:, runner.scratch, :, 1]).all(), "padding rows wrote past position 0"


def test_runner_rejects_bad_calls(runner):
    with pytest.raises(ValueError):
        runner.begin(runner.max_slots, SamplingSettings(), 0)
    runner.begin(0, SamplingSettings(temperature=0.0), 0)
    with pytest.raises(RuntimeError):
        runner.decode([0])  # no prefill yet
    with pytest.raises(ValueError):
        runner.prefill(0, [CFG.vocab_size], last=True)
    with pytest.raises(ValueError):
        runner.prefill(0, [1] * (runner.max_len + 1), last=True)
    runner.prefill(0, [1, 2], last=True)
    with pytest.raises(ValueError):
        runner.decode([0, 0])
    runner.release(0)


def test_memory_error_names_what_fits(ef):
    from qsparse_infer.serving.gpu_runner import GpuBatchRunner

    with pytest.raises(RuntimeError, match="would fit"):
        GpuBatchRunner(ef, max_slots=200, max_len=10**7)


# -- steps mixing prefill chunks and decode rows, the overlapping scheduler, logprobs -----------------------


def test_mixed_step_rows_equal_decode_only(runner):
    """Decode rows that share a step with other prompts' prefill chunks (eager mixed step) get the bits they get
    in graph-replayed decode-only steps; a prompt prefilled in chunks alongside them gets its one-chunk first
    token."""
    from qsparse_infer.serving.runner import PrefillChunk, StepPlan

    ps = prompts(4, seed=21)
    long = prompts(1, seed=22)[0] + prompts(1, seed=23)[0] + list(range(1, 12))
    alone = [decode_alone(runner, p, 0) for p in ps]
    first_long = decode_alone(runner, long, 0)[0][0]
    slots = [5, 11, 2, 30]
    for s, p in zip(slots, ps):
        runner.begin(s, SamplingSettings(temperature=0.0), 0)
        runner.prefill(s, p, last=True)
    runner.begin(7, SamplingSettings(temperature=0.0), 0)
    cut = [0, 5, 9, len(long)]
    for step in range(STEPS):
        chunks = [PrefillChunk(7, long[cut[step]:cut[step + 1]], cut[step + 1] == len(long))] if step < 3 else []
        res = runner.launch(StepPlan(chunks, slots)).result()
        lg = runner.last_logits()
        for i, s in enumerate(slots):
            assert res.decode_tokens[i] == alone[i][0][step + 1]
            assert torch.equal(lg[i], alone[i][1][step]), f"step {step} slot {s}"
        if step == 2:
            assert res.prefill_tokens[0] == first_long
    for s in slots + [7]:
        runner.release(s)


def _schedule(runner, tokenizer, reqs, prefill_chunk=32):
    from qsparse_infer.serving.scheduler import Delta, Finished, Scheduler

    sched = Scheduler(runner, tokenizer, prefill_chunk=prefill_chunk)
    events = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        sched.submit(r, events[i].append)
    sched.run_until_idle()
    st = sched.stats()
    assert (st["active"], st["waiting"], st["free_slots"]) == (0, 0, runner.max_slots), "a slot leaked"
    for ev in events:
        assert isinstance(ev[-1], Finished) and ev[-1].reason != "error", ev[-1]
    return [[e for e in ev if isinstance(e, Delta)] for ev in events], st


def test_greedy_alone_equals_among_16_concurrent(runner):
    """Through the overlapping scheduler (a step enqueued before the previous one's tokens are read, prompts
    prefilled in chunks inside decode steps): 16 greedy requests of mixed lengths give each the tokens it gives
    alone; seeded sampling with penalties too."""
    from qsparse_infer.serving.scheduler import GenerationRequest

    ps = prompts(16, seed=31)
    pen = SamplingSettings(temperature=0.9, top_k=40, seed=3, presence_penalty=1.0, frequency_penalty=0.5)
    reqs = [GenerationRequest(p, SamplingSettings(temperature=0.0) if i % 4 else pen, 6 + i % 7,
                              ignore_eos=True) for i, p in enumerate(ps)]
    alone = [_schedule(runner, None, [r])[0][0] for r in reqs]
    many, st = _schedule(runner, None, reqs)
    assert st["mixed_steps"] > 0
    for i, (a, m) in enumerate(zip(alone, many)):
        assert [t for d in a for t in d.token_ids] == [t for d in m for t in d.token_ids], f"request {i}"


def test_logprobs_match_teacher_forced_log_softmax():
    """The built-in model on the GPU runner: generated tokens' logprobs (top-5 too) and echo logprobs against
    log_softmax(Engine.logits(prompt + generated)) (the single-sequence decoder's teacher-forced prefill). The
    prompt rows run the same prefill kernels; decode rows differ from prefill rows only in fp32 rounding."""
    from qsparse_infer.engine import Engine
    from qsparse_infer.serving.gpu_runner import GpuBatchRunner
    from qsparse_infer.serving.scheduler import GenerationRequest

    engine = Engine.load(None, device="cuda")
    runner = GpuBatchRunner(engine, max_slots=4, max_len=128)
    tok = engine.tokenizer
    ps = [tok.encode(t) for t in ("ROMEO:", "JULIET: O Romeo, Romeo", "KING HENRY:\nWhat")]
    reqs = [GenerationRequest(p, SamplingSettings(temperature=0.7, seed=i), 12, ignore_eos=True, logprobs=5,
                              prompt_logprobs=True) for i, p in enumerate(ps)]
    deltas, _ = _schedule(runner, tok, reqs, prefill_chunk=4)
    for p, ds in zip(ps, deltas):
        toks = [t for d in ds for t in d.token_ids]
        lps = [x for d in ds for x in d.logprobs]
        ref = torch.log_softmax(engine.logits(p + toks).double(), -1)
        for i, (t, x) in enumerate(zip(toks, lps)):
            row = ref[len(p) - 1 + i]
            assert x.token_id == t and abs(x.logprob - float(row[t])) < 5e-3, (i, x.logprob, float(row[t]))
            assert [v for _, v in x.top] == pytest.approx(torch.topk(row, 5).values.tolist(), abs=5e-3)
        echo = ds[0].prompt_logprobs
        assert echo[0] is None and len(echo) == len(p)
        for j in range(1, len(p)):
            assert echo[j].token_id == p[j] and abs(echo[j].logprob - float(ref[j - 1, p[j]])) < 1e-3
