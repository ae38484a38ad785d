"""The persistent decode step (gpu/persistent.py, csrc/decode/step_kernel.cuh) against the multi-kernel step.

Contract (issue 16): bit-identical int32 accumulations and outputs, hence the same greedy tokens. The oracle
is the multi-kernel step itself: the same projections and attention run one kernel each (ternary_linear with
_raw_acc for the raw int32 sums). Both start from identical state (same engine file, prompt and prefill), so
every comparison is exact: torch.equal on int32 sums, on fp32 residual streams, and on the tokens.
Sizes: odd widths (D not a multiple of 512 or of 4 groups), GQA 1..8, head dims 32..128, bf16 and fp32 caches,
sparse and dense, contexts that take 1 and many attention splits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builders  # noqa: E402
from conftest import requires_gpu  # noqa: E402

from qsparse_infer.generate.sampling import SamplingSettings  # noqa: E402
from qsparse_infer.gpu.model import GpuModel  # noqa: E402
from qsparse_infer.gpu.persistent import PersistentStep, unsupported_reason  # noqa: E402
from qsparse_infer.kernels import decode as dk  # noqa: E402
from qsparse_infer.kernels.linear import ternary_linear  # noqa: E402
from qsparse_infer.model.config import ModelConfig, SparsityConfig  # noqa: E402
from qsparse_infer.model.format import read_engine  # noqa: E402
from qsparse_infer.model.random_model import random_engine  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]

GREEDY = SamplingSettings(temperature=0.0)

CONFIGS = {  # (config, sparsity, KV cache dtype)
    "bitnet": (*builders.GPU_BITNET, torch.bfloat16),  # bf16 cache
    "llama": (*builders.GPU_LLAMA, torch.float32),  # fp32 cache, G = 2
    # odd widths: D = 1100 (not a multiple of 512; ~1100/4 groups), ffn 1500, hd 40, MHA (G = 1), long context
    "odd": (ModelConfig(vocab_size=503, hidden_size=1100, intermediate_size=1500, num_layers=2, num_heads=5,
                        num_kv_heads=5, head_dim=40, max_seq_len=700, rope_theta=10000.0, activation="relu2",
                        attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=True),
            SparsityConfig(attn=0.7, o=0.55, mlp=0.45, down=0.65), torch.bfloat16),
    # 8 query heads per kv head, hd 128, wide FFN (the largest KPT class, D = 7200 > 7168: the radix select)
    "gqa8": (ModelConfig(vocab_size=300, hidden_size=1024, intermediate_size=7200, num_layers=2, num_heads=8,
                         num_kv_heads=1, head_dim=128, max_seq_len=300, rope_theta=10000.0, activation="silu",
                         attn_sub_norm=False, ffn_sub_norm=False, tie_word_embeddings=False),
             SparsityConfig(attn=0.6, o=0.6, mlp=0.6, down=0.6), torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def config(request):
    cfg, sp, kv = CONFIGS[request.param]
    return request.param, random_engine(cfg, sp, seed=5, embed_std=0.5), kv


def _pair(ef, kv, max_len=None, **kw):
    multi = GpuModel(ef, kv_dtype=kv, max_len=max_len, decode_kernel="multi", **kw)
    pers = GpuModel(ef, kv_dtype=kv, max_len=max_len, decode_kernel="persistent", **kw)
    return multi, pers


def test_greedy_tokens_and_residual_bits_match(config):
    """The same prompt, then steps on both decoders: identical h (fp32 bits) and token after every step,
    through the CUDA graph, across more positions than one attention split holds."""
    name, ef, kv = config
    cfg = ef.config
    steps = min(cfg.max_seq_len - 40, 300)
    multi, pers = _pair(ef, kv)
    assert pers.decode_kernel == "persistent"
    prompt = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(3))
    assert multi.prefill(prompt, GREEDY) == pers.prefill(prompt, GREEDY)
    for i in range(steps):
        a, b = multi.step(), pers.step()
        assert torch.equal(multi.h, pers.h), f"[{name}] residual stream differs at step {i}"
        assert a == b, f"[{name}] token differs at step {i}"
    assert multi.tokens() == pers.tokens()


def _multi_layers_with_raw(model: GpuModel) -> dict[tuple[int, str], torch.Tensor]:
    """The multi-kernel step's layers (exactly GpuModel._layers for decode) with every projection's raw int32
    sums kept."""
    w, k, cfg = model.weights, model.topk, model.cfg
    eps, glu = cfg.rms_norm_eps, cfg.activation
    raw: dict[tuple[int, str], torch.Tensor] = {}
    h, qkv, attn, mlp = model.h, model.qkv, model.attn, model.mlp

    def r(i: int, g: str, grp) -> torch.Tensor:
        raw[(i, g)] = torch.full((1, grp.npad), -7, dtype=torch.int32, device=model.device)
        return raw[(i, g)]

    for i, L in enumerate(w.layers):
        ternary_linear(h, L.qkv, k.attn, norm_weight=L.input_norm, norm_eps=eps, out=qkv, _raw_acc=r(i, "qkv", L.qkv))
        dk.rope_append_attention(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.k_cache[i],
                                 model.v_cache[i], model.pos, model.slot0, attn, model.attn_ws, model.cos_t,
                                 model.sin_t)
        ternary_linear(attn, L.o, k.o, norm_weight=L.attn_sub_norm, norm_eps=eps, residual=h, out=h,
                       _raw_acc=r(i, "o", L.o))
        ternary_linear(h, L.gate_up, k.gate_up, norm_weight=L.post_norm, norm_eps=eps, glu=glu, out=mlp,
                       _raw_acc=r(i, "gate_up", L.gate_up))
        ternary_linear(mlp, L.down, k.down, norm_weight=L.ffn_sub_norm, norm_eps=eps, residual=h, out=h,
                       _raw_acc=r(i, "down", L.down))
    return raw


@pytest.mark.parametrize("prefetch", [True, False])
def test_raw_int32_sums_bit_identical(config, prefetch):
    """One decode step's every projection: the persistent step's int32 column sums equal the multi-kernel
    kernels' exactly; outputs are poisoned (NaN) first, so everything read was written in the step."""
    name, ef, kv = config
    cfg = ef.config
    multi, pers = _pair(ef, kv, use_graph=False)
    step = PersistentStep(pers, prefetch=prefetch, raw=True)
    prompt = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(4))
    multi.prefill(prompt, GREEDY)
    pers.prefill(prompt, GREEDY)
    for m in (multi, pers):
        dk.embedding(m.embed, m.token, out=m.h)
        for buf in (m.qkv, m.attn, m.mlp):
            buf.fill_(float("nan"))
    want = _multi_layers_with_raw(multi)
    step.run()
    torch.cuda.synchronize()
    for (i, g), ref in want.items():
        got = step.raw_sums(i, g)[: ref.shape[1]]
        assert torch.equal(got, ref[0]), f"[{name}] layer {i} {g}: int32 sums differ"
    assert torch.equal(multi.h, pers.h)
    assert torch.isfinite(pers.h).all()
    for a, b in ((multi.qkv, pers.qkv), (multi.attn, pers.attn), (multi.mlp, pers.mlp)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grid", [1, 7])
def test_small_grids_give_the_same_bits(grid):
    """Fewer CTAs than tiles (every CTA walks many tiles of each op, and waits on itself never): same bits."""
    cfg, sp, kv = CONFIGS["odd"]
    ef = random_engine(cfg, sp, seed=8, embed_std=0.5)
    multi, pers = _pair(ef, kv, use_graph=False)
    pers.persistent = PersistentStep(pers, grid=grid)
    prompt = [1, 2, 3, 4, 5]
    assert multi.prefill(prompt, GREEDY) == pers.prefill(prompt, GREEDY)
    for _ in range(12):
        assert multi.step() == pers.step()
        assert torch.equal(multi.h, pers.h)


def test_builtin_model_golden_tokens():
    """The shipped model: both decode kernels give the same greedy continuation (and the same bits)."""
    ef = read_engine(Path(__file__).resolve().parents[2] / "qsparse_infer" / "data" / "shakespeare.qsp")
    multi, pers = _pair(ef, torch.bfloat16)
    prompt = list(range(10, 60))
    assert multi.prefill(prompt, GREEDY) == pers.prefill(prompt, GREEDY)
    multi.decode(200)
    pers.decode(200)
    assert multi.tokens() == pers.tokens()
    assert torch.equal(multi.h, pers.h)


def test_seeded_sampling_reproducible():
    cfg, sp, kv = CONFIGS["bitnet"]
    ef = random_engine(cfg, sp, seed=9, embed_std=0.5)
    multi, pers = _pair(ef, kv)
    s = SamplingSettings(temperature=0.9, top_p=0.9)
    runs = []
    for m in (multi, pers, pers):
        m.prefill([3, 1, 4, 1, 5], s, seed=123)
        m.decode(50)
        runs.append(m.tokens())
    assert runs[0] == runs[1] == runs[2]


def test_profile_records_every_op():
    cfg, sp, kv = CONFIGS["bitnet"]
    ef = random_engine(cfg, sp, seed=2, embed_std=0.5)
    m = GpuModel(ef, kv_dtype=kv, decode_kernel="persistent", use_graph=False)
    m.prefill([1, 2, 3], GREEDY)
    dk.embedding(m.embed, m.token, out=m.h)
    m.persistent.run(profile=True)
    prof = m.persistent.prof.cpu()
    assert prof.shape == (len(m.persistent.ops), m.persistent.grid, 8)
    ran = prof[:, :, 1]
    for j, op in enumerate(m.persistent.ops):
        want = op.ntiles if op.ntiles is not None else cfg.num_kv_heads  # 4 positions: one split per kv head
        assert int(ran[j].sum()) == want, m.persistent.op_names[j]
    active = ran > 0
    start, end, wait_done, first_end = (prof[:, :, c][active] for c in (0, 2, 4, 7))
    assert (start <= wait_done).all() and (wait_done <= first_end).all() and (first_end <= end).all()
    gemv = torch.tensor([op.name != "attention" for op in m.persistent.ops])[:, None].expand_as(active)[active]
    sel, prod = prof[:, :, 5][active][gemv], prof[:, :, 6][active][gemv]
    assert (wait_done[gemv] <= sel).all() and (sel <= prod).all() and (prod <= first_end[gemv]).all()
    assert (prof[:, :, 3][active] < torch.cuda.get_device_properties(0).multi_processor_count).all()


def test_unsupported_shapes_fall_back_or_refuse():
    # hd 36 in bf16 is 72 bytes a row: not a multiple of 16, so no persistent step
    cfg = ModelConfig(vocab_size=200, hidden_size=144, intermediate_size=200, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=36, max_seq_len=64, rope_theta=10000.0, activation="relu2",
                      attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=True)
    ef = random_engine(cfg, SparsityConfig(), seed=1)
    auto = GpuModel(ef, decode_kernel="auto")
    assert auto.decode_kernel == "multi"
    assert "16 bytes" in unsupported_reason(auto)
    with pytest.raises(ValueError, match="16 bytes"):
        GpuModel(ef, decode_kernel="persistent")
    with pytest.raises(ValueError, match="decode_kernel must be"):
        GpuModel(ef, decode_kernel="fast")
    with pytest.raises(ValueError, match="grid must be"):
        PersistentStep(GpuModel(random_engine(*CONFIGS["bitnet"][:2], seed=1), decode_kernel="multi"), grid=100000)


def test_switching_kernels_between_sequences():
    cfg, sp, kv = CONFIGS["bitnet"]
    ef = random_engine(cfg, sp, seed=6, embed_std=0.5)
    m = GpuModel(ef, kv_dtype=kv)
    m.prefill([9, 8, 7], GREEDY)
    m.decode(20)
    want = m.tokens()
    with pytest.raises(RuntimeError, match="between sequences"):
        m.set_decode_kernel("persistent")
    m.reset()
    m.set_decode_kernel("persistent")
    assert m.decode_kernel == "persistent"
    m.prefill([9, 8, 7], GREEDY)
    m.decode(20)
    assert m.tokens() == want
